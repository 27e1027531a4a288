"""Memory and time of one client's local training of a causal LM through fedlora, by model shape and
option: the resident memory (RSS) that training adds on top of the loaded model, its peak, and the
seconds per optimiser step. Each setting runs in a process of its own.

The model is a randomly initialised Llama of a real model's published shape (memory and time do not
depend on the weights' values), saved once to a temporary folder and loaded by fedlora as
`model.hf`; the batches are random token ids whose every position after the first is a target.
On a CPU, model.precision does not apply (fedlora.precision), so only float32 with and without
activation checkpointing is measured here; on a GPU the same script measures CUDA memory too.

    python benchmarks/causal_memory.py --shape smollm2-135m --length 256 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the shapes of the published config.json files (HuggingFaceTB/SmolLM2-135M, meta-llama/Llama-3.2-1B)
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True),
}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(folder: str, length: int, batch: int, steps: int, options: list[str]) -> dict:
    """In this process: fedlora's model of the saved folder, LoRA on q_proj and v_proj, `steps` steps."""
    import torch

    from fedlora.config import compose, resolve
    from fedlora.methods import make_method
    from fedlora.training import pick_device, train_local

    cfg = resolve(compose(["dataset=hf", "dataset.path=" + folder + "/data.jsonl", "model.task=causal_lm",
                           f"model.hf={folder}", f"model.max_length={length}", "adapter=lora", "adapter.r=8",
                           "adapter.targets=[q_proj,v_proj]", "method=fedit", "partition=iid", "num_clients=1",
                           "clients_per_round=1", f"local.batch_size={batch}", f"local.steps={steps}", *options]))
    model = make_method(cfg).initial_model()
    device = pick_device()
    vocab = model.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.zeros((batch * steps, 3, length), dtype=torch.int64)
    x[:, 0] = torch.randint(0, vocab, (batch * steps, length), generator=g)
    x[:, 1] = 1
    x[:, 2, 1:] = 1
    y = torch.zeros(batch * steps, dtype=torch.int64)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        loaded_gpu = torch.cuda.memory_allocated()
    before, peak, done = rss(), [rss()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()
    train_local(model, x, y, cfg.local, seed=0, device=device)
    seconds = time.time() - started
    done.set()
    sampler.join()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"options": options, "rss_loaded_gib": round(before / 2**30, 3),
           "rss_training_added_gib": round((peak[0] - before) / 2**30, 3), "rss_peak_gib": round(peak[0] / 2**30, 3),
           "seconds_per_step": round(seconds / steps, 2), "trained_parameters": trained,
           "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out |= {"gpu_loaded_gib": round(loaded_gpu / 2**30, 3),
                "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("FOLDER", "OPTIONS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.length, args.batch, args.steps, json.loads(args.one[1]))))
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = [[], ["model.gradient_checkpointing=true"]]
    if torch.cuda.is_available():
        settings += [["model.precision=bf16"], ["model.precision=bf16", "model.gradient_checkpointing=true"]]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], bos_token_id=None, eos_token_id=0,
                                     pad_token_id=0)).save_pretrained(folder)
        Path(folder, "data.jsonl").write_text('{"instruction": "a", "input": "", "response": "b"}\n' * 2)
        for options in settings:
            done = subprocess.run([sys.executable, __file__, "--length", str(args.length), "--batch", str(args.batch),
                                   "--steps", str(args.steps), "--one", folder, json.dumps(options)],
                                  capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"shape": args.shape, "length": args.length, "batch": args.batch, "steps": args.steps,
                      "adapter": "lora r=8 on q_proj, v_proj", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "torch_threads": torch.get_num_threads(),
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
