"""The Citrus-V model: Qwen2.5-VL (`mllm`) + the `[SEG]` projector + SAM2 (`grounding_encoder.sam2_model`).

Attribute names are the state-dict prefixes of the released checkpoint. The SAM2 side reproduces the
reference's `SAM2TrainRunner.get_sam2_embeddings` + `inject_language_embd` + `SAM2Base._forward_sam_heads`
on the installed `sam2` package's modules: image features with `no_mem_embed` added to the lowest level,
the projected `[SEG]` vector appended as a third sparse token after SAM2's two "not-a-point" tokens, the
no-mask dense embedding, multimask output and the best candidate by predicted IoU. As in the reference,
the object score is returned but never suppresses the mask.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn


class SegProjector(nn.Sequential):
    """Linear(H, H) -> ReLU -> Linear(H, D) -> Dropout(0): keys `seg_projector.0.*`, `seg_projector.2.*`."""

    def __init__(self, hidden_size: int, prompt_dim: int):
        super().__init__(nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True),
                         nn.Linear(hidden_size, prompt_dim), nn.Dropout(0.0))


@dataclass
class SAM2ImageFeatures:
    """SAM2 features of a batch of images, ready for the mask decoder."""

    image_embed: torch.Tensor          # [B, C, h, w], lowest level + no_mem_embed
    high_res_feats: list[torch.Tensor]  # [B, C/8, 4h, 4w], [B, C/4, 2h, 2w] after conv_s0 / conv_s1

    def select(self, index: torch.Tensor) -> "SAM2ImageFeatures":
        """Rows `index` of the batch (one per prompt), so one image's features serve many prompts."""
        return SAM2ImageFeatures(self.image_embed[index], [f[index] for f in self.high_res_feats])


@dataclass
class SAM2MaskPrediction:
    """The decoder's answer for a batch of prompts (float32)."""

    low_res_logits: torch.Tensor     # [N, 256, 256]: the candidate with the best predicted IoU
    multimask_logits: torch.Tensor   # [N, K, 256, 256]: every candidate
    iou: torch.Tensor                # [N]: predicted IoU of the chosen candidate
    object_score: torch.Tensor       # [N]: object-score logit (positive: object present)


class SAM2GroundingEncoder(nn.Module):
    """Holds the whole SAM2 model (`sam2_model`) and runs its image encoder and language-prompted decoder."""

    def __init__(self, sam2_model: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.sam2_model = sam2_model
        # The reference runs SAM2 under a CUDA-only autocast to grounding_encoder_config.torch_dtype.
        self.autocast_dtype = autocast_dtype

    @property
    def hidden_dim(self) -> int:
        return int(self.sam2_model.hidden_dim)

    @property
    def image_size(self) -> int:
        return int(self.sam2_model.image_size)

    def _autocast(self, device: torch.device):
        if device.type == "cuda" and self.autocast_dtype is not None:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return nullcontext()

    def encode_images(self, pixel_values: torch.Tensor) -> SAM2ImageFeatures:
        """`pixel_values`: [B, 3, S, S] normalised SAM2 input (S = image_size)."""
        return self.features_from_backbone(self.backbone(pixel_values))

    def backbone(self, pixel_values: torch.Tensor) -> dict:
        """SAM2's `forward_image`: the FPN levels (high-resolution ones through conv_s0 / conv_s1) and their
        position encodings. The video predictor consumes this dict; `features_from_backbone` makes decoder input."""
        with self._autocast(pixel_values.device):
            return self.sam2_model.forward_image(pixel_values)

    def features_from_backbone(self, backbone_out: dict) -> SAM2ImageFeatures:
        """The decoder's inputs from `backbone` output: flattened levels, `no_mem_embed` on the lowest."""
        sam2 = self.sam2_model
        with self._autocast(backbone_out["backbone_fpn"][0].device):
            _, vision_feats, _, feat_sizes = sam2._prepare_backbone_features(backbone_out)
            batch = vision_feats[-1].size(1)
            high_res = [x.permute(1, 2, 0).reshape(batch, x.size(2), *size)
                        for x, size in zip(vision_feats[:-1], feat_sizes[:-1])]
            if not sam2.directly_add_no_mem_embed:
                raise NotImplementedError("SAM2 configs without directly_add_no_mem_embed are not supported")
            lowest = vision_feats[-1] + sam2.no_mem_embed
            image_embed = lowest.permute(1, 2, 0).reshape(batch, self.hidden_dim, *feat_sizes[-1])
        return SAM2ImageFeatures(image_embed, high_res)

    def decode_masks(self, features: SAM2ImageFeatures, language_embeds: torch.Tensor) -> SAM2MaskPrediction:
        """One mask per row: `language_embeds` [N, 1, C] pairs with row n of `features` (batch N)."""
        return self.decode(features, SAM2Prompts(language_embeds=language_embeds))

    def decode(self, features: SAM2ImageFeatures, prompts: "SAM2Prompts") -> SAM2MaskPrediction:
        """SAM2's prompt encoder + mask decoder on row n of `features` with row n of `prompts`, as the reference's
        `SAM2Base._forward_sam_heads`: without points SAM2 pads with one "not-a-point" (label -1); the prompt
        encoder adds one more padding point after the given ones (boxes travel as points labelled 2, 3); the
        projected [SEG] tokens follow the point tokens; multimask output by SAM2's own rule on the point count."""
        sam2 = self.sam2_model
        prompt_encoder = sam2.sam_prompt_encoder
        count = features.image_embed.size(0)
        device = features.image_embed.device
        with self._autocast(device):
            if prompts.point_coords is None:
                coords = torch.zeros(count, 1, 2, device=device)
                labels = -torch.ones(count, 1, dtype=torch.int32, device=device)
                point_inputs = None
            else:
                coords = prompts.point_coords.to(device, torch.float32)
                labels = prompts.point_labels.to(device, torch.int32)
                point_inputs = {"point_coords": coords, "point_labels": labels}
            masks = None if prompts.mask_logits is None else prompts.mask_logits.to(device, torch.float32)
            sparse, dense = prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
            if prompts.language_embeds is not None:
                sparse = torch.cat([sparse, prompts.language_embeds.to(device, sparse.dtype)], dim=1)
            multimask = sam2._use_multimask(is_init_cond_frame=True, point_inputs=point_inputs)
            logits, ious, _, object_scores = sam2.sam_mask_decoder(
                image_embeddings=features.image_embed, image_pe=prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multimask, repeat_image=False, high_res_features=features.high_res_feats)
        logits = logits.float()
        ious = ious.float()
        best = torch.argmax(ious, dim=-1)
        rows = torch.arange(count, device=device)
        return SAM2MaskPrediction(low_res_logits=logits[rows, best], multimask_logits=logits,
                                  iou=ious[rows, best], object_score=object_scores.float().reshape(count))


@dataclass
class SAM2Prompts:
    """SAM2 prompts for a batch of N decodes, already in SAM2's input frame (the stretched image_size square).

    `point_coords` [N, P, 2] (x, y) and `point_labels` [N, P] (1 include, 0 exclude, 2 / 3 a box's top-left /
    bottom-right corner, box corners first as SAM2 orders them); `mask_logits` [N, 1, 256, 256] the dense prompt
    (a previous low-resolution prediction); `language_embeds` [N, 1, C] projected [SEG] tokens. All optional:
    nothing at all is the reference's language-only path with the [SEG] token alone.
    """

    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None
    language_embeds: torch.Tensor | None = None


class CitrusVModel(nn.Module):
    """Qwen2.5-VL + `[SEG]` projector + SAM2, with the released checkpoint's attribute names."""

    def __init__(self, config, mllm: nn.Module, sam2_model: nn.Module, sam2_autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.mllm = mllm
        self.grounding_encoder = SAM2GroundingEncoder(sam2_model, sam2_autocast_dtype)
        hidden_size = mllm.config.text_config.hidden_size
        self.seg_projector = SegProjector(hidden_size, self.grounding_encoder.hidden_dim)

    @property
    def final_norm(self) -> nn.Module:
        """The language model's final RMSNorm: its output is `hidden_states[-1]`, the `[SEG]` state."""
        return self.mllm.model.language_model.norm

    @property
    def device(self) -> torch.device:
        return self.seg_projector[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.seg_projector[0].weight.dtype

    def project_seg(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] last-layer states at `[SEG]` -> [N, 1, C] SAM2 prompt tokens."""
        return self.seg_projector(seg_hidden.to(self.dtype)).unsqueeze(1)
