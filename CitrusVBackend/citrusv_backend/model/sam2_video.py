"""SAM2's video predictor as the volume pipeline uses it: object-score suppression switchable, low-res logits kept.

The `sam2` package's `SAM2Base._forward_sam_heads` (sam2/modeling/sam2_base.py, the `if self.pred_obj_scores:`
block after the mask decoder) replaces every mask whose object-score logit is <= 0 by -1024 everywhere, and the
video predictor reaches it through `track_step` for every propagated slice. Citrus-V's own `SAM2Base`
(`architectures/sam2_base.py`) comments that suppression out, and its object-score head was never trained, so
here it is off unless `suppress_absent_objects` is set. The object pointer is left exactly as SAM2 computes it
(Citrus-V's override keeps that part too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sam2.sam2_video_predictor import SAM2VideoPredictor


class CitrusVVideoPredictor(SAM2VideoPredictor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.suppress_absent_objects = False   # SAM2's own behaviour when True
        self.last_low_res_masks: torch.Tensor | None = None

    def _forward_sam_heads(self, backbone_features, point_inputs=None, mask_inputs=None, high_res_features=None,
                           multimask_output=False):
        if self.suppress_absent_objects or not self.pred_obj_scores:
            return super()._forward_sam_heads(backbone_features, point_inputs, mask_inputs, high_res_features,
                                              multimask_output)
        decoded: list[torch.Tensor] = []
        handle = self.sam_mask_decoder.register_forward_hook(lambda _m, _i, output: decoded.append(output[0]))
        try:
            outputs = super()._forward_sam_heads(backbone_features, point_inputs, mask_inputs, high_res_features,
                                                 multimask_output)
        finally:
            handle.remove()
        _, _, ious, _, _, obj_ptr, object_score_logits = outputs
        # The decoder's own masks, before the suppression; the candidate is chosen as SAM2 chooses it.
        low_res_multimasks = decoded[-1].float()
        high_res_multimasks = F.interpolate(low_res_multimasks, size=(self.image_size, self.image_size),
                                            mode="bilinear", align_corners=False)
        if multimask_output:
            rows = torch.arange(low_res_multimasks.size(0), device=low_res_multimasks.device)
            best = torch.argmax(ious, dim=-1)
            low_res_masks = low_res_multimasks[rows, best].unsqueeze(1)
            high_res_masks = high_res_multimasks[rows, best].unsqueeze(1)
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        return (low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks, obj_ptr,
                object_score_logits)

    def _get_orig_video_res_output(self, inference_state, any_res_masks):
        # Keep the 256x256 logits of the frame being returned: presence is judged on them, and the reference's
        # nearest-neighbour mask upsampling starts from them.
        self.last_low_res_masks = any_res_masks
        return super()._get_orig_video_res_output(inference_state, any_res_masks)
