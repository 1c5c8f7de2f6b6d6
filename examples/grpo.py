# /// script
# dependencies = ["hf-ext"]
# ///
"""GRPO with hf_ext's loss types, on the embedded default (offline, CPU) or on a real model.

One process, offline, on the embedded tiny Qwen2 and its alphabet task:

    accelerate launch examples/grpo.py --config examples/configs/grpo_ba.yaml

Two CPU processes (accelerate needs --multi_gpu plus the recipe's `use_cpu: true` to start two ranks on CPU):

    accelerate launch --multi_gpu --num_processes 2 examples/grpo.py --config examples/configs/grpo_ba.yaml

A real model on GPUs (any Hub id or local path; a dataset with "prompt" and "solution" columns for this reward):

    accelerate launch --multi_gpu --num_processes 8 examples/grpo.py --config examples/configs/grpo_ba.yaml \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name YOUR/DATASET \\
        --reward_funcs trl.rewards.accuracy_reward --use_cpu false --bf16 true --learning_rate 1e-6 \\
        --max_completion_length 1024 --per_device_train_batch_size 16 --max_steps 500

`hf-ext grpo` takes the same arguments.
"""

from hf_ext.scripts.grpo import run


if __name__ == "__main__":
    run()
