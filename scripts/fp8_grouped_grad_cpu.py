"""Does the FP8 input gradient in one product per group (q/k/v, gate/up) train as the
product per layer does? A LoRA fine-tune of a small llama on the bundled instructions
with FP8 base weights through sloth's fused ops, the same seed and data, both ways; prints
each run's eval loss and its training losses (CPU, interpreted kernels: about 40 s a
step).

    TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 python scripts/fp8_grouped_grad_cpu.py [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sloth_fp8.linear import Fp8Linear

from sloth_core.testing import datasets, installed_manager, tiny_model
from sloth_core.testing.models import pretrain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sloth_core.plugins import using_plugin_manager
    from sloth_core.train import TrainConfig, train

    manager = installed_manager("sloth-fp8", "sloth-llama", "sloth-kernels")
    data = Path(datasets.__file__).parent / "data" / "tiny_instructions.jsonl"
    grouped = Fp8Linear.__dict__["sloth_input_grads"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # A small model trained a little first, as the 200-step quality test does.
        path = tiny_model("llama", Path(tmp) / "model")
        model, tokenizer = (AutoModelForCausalLM.from_pretrained(path),
                            AutoTokenizer.from_pretrained(path))  # fmt: skip
        lines = [row["output"] for row in datasets.load_tiny_instructions()]
        pretrain(model, tokenizer, lines, steps=60, batch_size=8, window=32, learning_rate=3e-3)
        model.save_pretrained(path)
        for way in ("grouped", "per layer"):
            if way == "per layer":  # the fused ops then sum sloth_input_grad per layer
                delattr(Fp8Linear, "sloth_input_grads")
            config = TrainConfig.from_mapping({
                "model_name": str(path), "dataset": str(data), "quantization": "fp8",
                "output_dir": str(Path(tmp) / way.replace(" ", "-")), "eval_fraction": 0.2,
                "max_steps": args.steps, "per_device_train_batch_size": 4,
                "learning_rate": 2e-3, "max_seq_length": 64, "seed": 3, "save_method": "none",
                "gradient_checkpointing": "off", "report_to": "none", "dtype": "fp32",
            })  # fmt: skip
            try:
                with using_plugin_manager(manager):
                    result = train(config, show_progress=False)
            finally:
                Fp8Linear.sloth_input_grads = grouped
            results[way] = {"eval_loss": result.eval_after["eval_loss"],
                            "losses": [round(x, 4) for x in result.losses]}  # fmt: skip
            print(way, json.dumps(results[way]), flush=True)
    a, b = results["grouped"]["eval_loss"], results["per layer"]["eval_loss"]
    print(f"eval loss grouped {a:.4f}, per layer {b:.4f}: {100 * (a - b) / b:+.2f}%")


if __name__ == "__main__":
    main()
