# /// script
# dependencies = ["hf-ext"]
# ///
"""SFT of a LoRA adapter with ALLoRA, on the embedded default (offline, CPU) or on a real model.

    accelerate launch examples/sft_allora.py --config examples/configs/sft_allora.yaml
    accelerate launch --multi_gpu --num_processes 2 examples/sft_allora.py --config examples/configs/sft_allora.yaml

A real model on GPUs:

    accelerate launch --multi_gpu --num_processes 8 examples/sft_allora.py --config examples/configs/sft_allora.yaml \\
        --model_name_or_path Qwen/Qwen2-0.5B --dataset_name YOUR/DATASET --use_cpu false --bf16 true \\
        --learning_rate 1e-4 --lora_target_modules all-linear --num_eval_examples 0 --eval_strategy no

`hf-ext sft` takes the same arguments. From Python: `hf_ext.SFTConfig(use_allora=True, allora_eta=2.0)` with
`peft_config=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0)`; with PEFT alone: `hf_ext.peft.enable_allora(config)`.
"""

from hf_ext.scripts.sft import run


if __name__ == "__main__":
    run()
