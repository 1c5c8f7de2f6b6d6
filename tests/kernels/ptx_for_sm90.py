"""Compile hf_ext's Triton kernels for an sm_90 GPU (no GPU needed: Triton's bundled ptxas) and print one JSON object:
each 4-bit step kernel variant, compiled with the launch options it runs with, -> the fma instructions in its PTX
(with ``--fusion`` the options' FP fusion is turned back on: the control, the same kernels then contract); under
"dora", each DoRA kernel variant with bf16 activations and weights -> 1 once it compiled."""

import json
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from hf_ext.kernels import adamw4bit_step as fused
from hf_ext.kernels import dispatch, dora_compose, dora_norm


TABLE = {"table_ptr": "*i64", "table_f32_ptr": "*fp32", "n_tensors": "i32"}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def fma_count(kernel, signature: dict, constants: dict, options: dict = dispatch.FMA_ALLOWED) -> int:
    full = {**signature, **dict.fromkeys(constants, "constexpr")}
    where = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    compiled = compile(ASTSource(kernel, full, where), target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["ptx"].count("fma.")


def dora_variants() -> dict:
    """Compile each DoRA kernel in the variants its launches choose (bf16 tensors, fp32 statistics)."""
    done = {}
    sizes = {"n_rows": "i32", "d_in": "i32", "rank": "i32", "stride_row": "i32", "stride_col": "i32"}
    product = {"w_ptr": "*bf16", "a_ptr": "*fp32", "u_ptr": "*fp32", "row_sq_ptr": "*fp32", **sizes}
    for row_sq in (True, False):
        for block_r in (16, dora_norm.PRODUCT_BLOCK_R):
            constants = {"ROW_SQ": row_sq, "BLOCK_M": dora_norm.BLOCK_M, "BLOCK_K": dora_norm.PRODUCT_BLOCK_K,
                         "BLOCK_R": block_r}  # fmt: skip
            fma_count(dora_norm._weight_lora_product_kernel, product, constants)
            done[f"product row_sq={row_sq} block_r={block_r}"] = 1
    rows = dict.fromkeys(("u_ptr", "b_ptr", "g_ptr", "wsq_ptr", "out_ptr"), "*fp32")
    rows.update(n_rows="i32", rank="i32", two_s="fp32", s_sq="fp32")
    fma_count(dora_norm._dora_norm_rows_kernel, rows, {"BLOCK_M": dora_norm.BLOCK_M, "BLOCK_R": dora_norm.BLOCK_R})
    done["norm rows"] = 1
    blocks = {"BLOCK_T": dora_compose.BLOCK_T, "BLOCK_D": dora_compose.BLOCK_D}
    forward = dict.fromkeys(("result_ptr", "base_ptr", "bias_ptr", "lora_ptr"), "*bf16")
    forward.update(g_ptr="*fp32", out_ptr="*bf16", inner_ptr="*bf16", n_tokens="i32", d_out="i32", scaling="fp32")
    for has_base in (True, False):
        for save_inner in (True, False):
            constants = {"HAS_BASE": has_base, "HAS_BIAS": not has_base, "SAVE_INNER": save_inner, **blocks}
            fma_count(dora_compose._compose_fwd_kernel, forward, constants)
            done[f"compose forward base={has_base} inner={save_inner}"] = 1
    backward = {"dy_ptr": "*bf16", "g_ptr": "*fp32", "inner_ptr": "*bf16", "dmain_ptr": "*bf16", "dlora_ptr": "*bf16"}
    backward.update(partial_ptr="*fp32", n_tokens="i32", d_out="i32", scaling="fp32", base_shift="fp32")
    for reduce in (True, False):
        constants = {"WRITE_MAIN": True, "WRITE_LORA": True, "REDUCE": reduce, **blocks}
        fma_count(
            dora_compose._compose_bwd_kernel, backward, dict(constants, ROWS_PER_PROGRAM=dora_compose.ROWS_PER_PROGRAM)
        )
        done[f"compose backward reduce={reduce}"] = 1
    return done


def main() -> None:
    options = dict(dispatch.TWIN_ROUNDING, **({"enable_fp_fusion": True} if "--fusion" in sys.argv else {}))
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
    print(json.dumps({"step": counts, "dora": dora_variants()}))


if __name__ == "__main__":
    main()
