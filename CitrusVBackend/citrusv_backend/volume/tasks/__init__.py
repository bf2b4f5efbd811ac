"""The volume tasks on top of the 2D model, one module per task: `segment`, `detect` (box geometry in `boxes`),
`report`, and the conversation about a slice, the ask task (`conversation`); `pipeline.VolumePipeline` runs the
first three and holds what they share. Their steps: `targets` (prompts), `sampling` (slices and pixel budget),
`presence` (mask logits), `propagation` (SAM2 video memory), `mask_cleanup`; `results` is what they return."""
