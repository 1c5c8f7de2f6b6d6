"""Compile the 4-bit step's Triton kernels for an sm_90 GPU (no GPU needed: Triton's bundled ptxas) with the launch
options they run with, and print one JSON object: each kernel variant -> the fma instructions in its PTX. With
``--fusion`` the options' FP fusion is turned back on (the control: the same kernels then contract)."""

import json
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from hf_ext.kernels import adamw4bit_step as fused


TABLE = {"table_ptr": "*i64", "table_f32_ptr": "*fp32", "n_tensors": "i32"}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def fma_count(kernel, signature: dict, constants: dict, options: dict) -> int:
    full = {**signature, **dict.fromkeys(constants, "constexpr")}
    where = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    compiled = compile(ASTSource(kernel, full, where), target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["ptx"].count("fma.")


def main() -> None:
    options = dict(fused.LAUNCH_OPTIONS, **({"enable_fp_fusion": True} if "--fusion" in sys.argv else {}))
    counts = {}
    maps = dict.fromkeys(("de_ptr", "de_mid_ptr", "lin_ptr", "lin_mid_ptr"), "*fp32")
    for dtype, name in DTYPES.items():  # param and grad of one dtype
        p_dtype = g_dtype = fused._TL_DTYPES[dtype]
        common = {"P_DTYPE": p_dtype, "G_DTYPE": g_dtype, "MAX_TENSORS": fused.MAX_TENSORS_PER_LAUNCH}
        for mode in (fused.V_BLOCK, fused.V_RANK1, fused.V_FACTORED):
            constants = {"BLOCK": 128, "BLOCKS_PER_PROGRAM": fused.BLOCKS_PER_PROGRAM, "V_MODE": mode, **common}
            counts[f"step v_mode={mode} {name}"] = fma_count(
                fused._adamw4bit_kernel, {**TABLE, **maps}, dict(constants, COLUMNS=fused.TABLE_WIDTH), options
            )
        counts[f"fp32 states {name}"] = fma_count(
            fused._adamw_fp32_kernel, TABLE,
            dict(common, BLOCK=fused.FP32_BLOCK, COLUMNS=fused.FP32_TABLE_WIDTH), options,
        )  # fmt: skip
        rows, cols = fused.STATS_TILE
        counts[f"rank-1 statistics {name}"] = fma_count(
            fused._rank1_stats_kernel, {**TABLE, "lin_ptr": "*fp32"},
            {"G_DTYPE": g_dtype, "BLOCK_R": rows, "BLOCK_C": cols, "MAX_TENSORS": fused.MAX_TENSORS_PER_LAUNCH,
             "COLUMNS": fused.TABLE_WIDTH}, options,
        )  # fmt: skip
        counts[f"squared sums {name}"] = fma_count(
            fused._squared_sums_kernel,
            {"g_ptr": f"*{name}", "row_parts_ptr": "*fp32",
             "col_parts_ptr": "*fp32", "grad_max_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "n_slices": "i32"},
            {"BLOCK_R": rows, "BLOCK_C": cols, "ROW_TILES": fused.SUM_ROW_TILES}, options,
        )  # fmt: skip
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
