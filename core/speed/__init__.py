"""GPU speed: the same maths as peft + transformers, in fewer kernels, launches and bytes.

Every piece is tested against the plain path (tests/speed/test_perf.py on CPU, bench/gpu_check.py on a
GPU) and has a switch in config.SpeedConfig (`speed` in a run's config.json).

- tune.py: tune_model(), the model surgery that keeps the function (fused GELU, 16-bit LayerNorm
  output, fp32 residual stream under fp16) and installs the patches below;
- qlinear.py: a 4-bit linear layer and its LoRA adapter as one autograd function (a gated MLP's
  act(gate) * up inside down_proj's, as one Triton kernel each way on a GPU: glu.py); on a GPU,
  layers that read one input (q/k/v, gate/up) as one (one GEMM each way); double-quantised scales
  dequantised once and kept;
- rmsnorm.py: every RMSNorm as one autograd function keeping its input and rstd (one Triton kernel
  each way on a GPU);
- attention.py: the rotary embedding in one pass in every rotary family's attention (Phi's own
  forward; the others' transformers forward with apply_rotary_pos_emb bound to rope.py);
- rope.py: the rotary embedding (partial or full) as one Triton kernel;
- triton_gpu.py: where the Triton kernels of rope.py, rmsnorm.py and glu.py run;
- packing.py: a batch's rows end to end with no padding, for every decoder family it lists (its
  attention function in transformers' AttentionInterface; FlashAttention's varlen kernel);
- patch.py: how a module's forward is replaced, and how other code tells it was;
- step.py: TrainStep, forward + backward of one optimiser step (packed or padded, micro-batches);
- graphs.py: CUDA graph capture and replay (training steps, evaluation forwards);
- accounting.py: FLOPs and MFU, peak GPU memory, and the late-read per-step log.
"""
