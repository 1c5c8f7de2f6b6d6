"""Test probe for runs launched through the real CLI. With HF_EXT_PROBE_DIR set, every Trainer records at the end of
training what it really ran (world size, loss type, metric prefixes, adapter layer and variant classes, optimizer
class and state layouts) to HF_EXT_PROBE_DIR/rank{N}.json. It is a `sitecustomize` put first on PYTHONPATH, so it
reaches the processes `accelerate launch` starts; the next `sitecustomize` on sys.path still runs."""

import importlib.util
import os
import sys


def _install(out_dir: str) -> None:
    import json

    import torch
    import transformers

    class Probe(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
            states = list(optimizer.state.values())
            adapters = [m for m in model.modules() if hasattr(m, "lora_variant")]
            record = {
                "world_size": args.world_size,
                "loss_type": getattr(args, "loss_type", None),
                "metric_prefixes": sorted(
                    {key.split("/")[0] for log in state.log_history for key in log if "/" in key}
                ),
                "layer_classes": sorted({f"{type(m).__module__}.{type(m).__name__}" for m in adapters}),
                "variant_classes": sorted({type(v).__name__ for m in adapters for v in m.lora_variant.values()}),
                "num_adapter_layers": len(adapters),
                "optimizer": type(optimizer).__name__,
                "uint8_states": sum(any(getattr(t, "dtype", None) is torch.uint8 for t in s.values()) for s in states),
                "num_states": len(states),
            }
            with open(os.path.join(out_dir, f"rank{args.process_index}.json"), "w") as handle:
                json.dump(record, handle)

    train = transformers.Trainer.train

    def probed_train(self, *args, **kwargs):
        self.add_callback(Probe())
        return train(self, *args, **kwargs)

    transformers.Trainer.train = probed_train


def _run_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "sitecustomize.py")
        if os.path.isfile(candidate) and os.path.dirname(os.path.abspath(candidate)) != here:
            spec = importlib.util.spec_from_file_location("_next_sitecustomize", candidate)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if os.environ.get("HF_EXT_PROBE_DIR"):
    _install(os.environ["HF_EXT_PROBE_DIR"])
_run_next_sitecustomize()
