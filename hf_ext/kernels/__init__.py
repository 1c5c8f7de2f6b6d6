"""hf_ext's compute kernels, one module per op.

Each op module holds a Triton kernel, a pure-torch twin of the same algorithm (the fallback and the tests' oracle) and,
where the op is differentiable, the ``torch.autograd.Function`` that wraps both: ``adamw4bit_step`` (the fused 4-bit
AdamW update), ``dora_norm`` (DoRA's weight row norm from the LoRA factors) and ``dora_compose`` (DoRA's output
composition, forward and backward). An op may also have a C version for the CPU beside it (``<op>.c``, so far
``adamw4bit_step``), built and loaded by ``cpu_library``. ``dispatch`` holds the one rule every op follows: its Triton
kernel for CUDA tensors when triton imports and ``HF_EXT_DISABLE_TRITON`` is unset, its C version for CPU tensors when
it has one that builds and ``HF_EXT_DISABLE_CPU_KERNELS`` is unset, its twin everywhere else. ``quant4`` holds the
4-bit codebooks, quantizers and nibble packing of optimizer states; nothing here imports ``hf_ext.optim``, which builds
on this package.
"""
