"""Ray Data / Ray Train building blocks, in three flows that meet only through the data layer.

- `pipeline.data`: image sources, preprocessing, the Parquet corpus, pretokenization (adaptive lengths too).
- `pipeline.eval`: Inception features, FID statistics, reconstruction and generation sweeps, reports.
- `pipeline.train`: the Ray Train loop and its two tasks (tokenizer with REPA, AR model).

Modules at this level are shared by all three: `devices` (where a stage runs), `malloc` (the workers'
allocator settings), `inception` (the feature network) and `image_metrics` (PSNR / SSIM).
`eval` and `train` may import `data`; `data` imports neither.
"""
