"""model.task=causal_lm: instruction tuning of a causal LM. The tests build a tiny random Llama with a
word-level tokenizer of a small vocabulary, and an instruction file, themselves: the loss is taken on
the response tokens only and equals Hugging Face's own loss with the prompt masked out; a 2-round
federated run lowers the held-out loss; its PEFT export loads and gives the global model's logits."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import metrics_rows
from fedlora.config import compose, resolve
from fedlora.errors import ConfigError

COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow",
           "sea": "blue", "leaf": "green", "milk": "white", "night": "black", "cherry": "red", "lemon": "yellow"}


def examples(n: int, seed: int = 0) -> list[dict]:
    """Instructions with a learnable answer: the colour of a thing, sometimes with an input."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        thing = rng.choice(sorted(COLOURS))
        if rng.random() < 0.5:
            out.append({"instruction": f"What colour is the {thing} ?", "input": "", "response": COLOURS[thing]})
        else:
            out.append({"instruction": "Name the colour of this thing .", "input": thing, "response": COLOURS[thing]})
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A folder with a 2-layer random Llama (hidden 32) and a word-level tokenizer of the examples' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedlora.causal import ALPACA, ALPACA_NO_INPUT

    folder = tmp_path_factory.mktemp("tiny-llama")
    words = [ALPACA, ALPACA_NO_INPUT] + [" ".join(e.values()) for e in examples(200)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    path = tmp_path_factory.mktemp("instructions") / "colours.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples(240, seed=1)))
    return path


def overrides(tiny_llama, instructions, *extra):
    return ["dataset=hf", f"dataset.path={instructions}", "model.task=causal_lm", f"model.hf={tiny_llama}",
            "model.max_length=64", "adapter=lora", "adapter.r=4", "adapter.targets=[q_proj,v_proj]", "method=fedit",
            "partition=iid", "num_clients=4", "clients_per_round=2", "num_rounds=2", "local.batch_size=16", "local.lr=0.01",
            *extra]


def test_only_the_response_and_the_end_token_are_targets(tiny_llama):
    from transformers import AutoTokenizer

    from fedlora.causal import prompt, tokenize_instructions

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    p = prompt("What colour is the sky ?", "", None)
    assert p.startswith("Below is an instruction") and "### Response:" in p and "### Input" not in p
    assert "### Input:\nsky" in prompt("Name the colour of this thing .", "sky", None)
    tokens = tokenize_instructions([p], ["blue"], str(tiny_llama), 64)
    ids, mask, target = tokens[0]
    n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
    assert target.sum() == 2 and target[n_prompt] == 1 and target[n_prompt + 1] == 1  # "blue", then </s>
    assert ids[n_prompt] == tok.convert_tokens_to_ids("blue") and ids[n_prompt + 1] == tok.eos_token_id
    assert mask.sum() == n_prompt + 2 and (ids[n_prompt + 2:] == tok.pad_token_id).all()
    cut = tokenize_instructions([p], ["blue"], str(tiny_llama), n_prompt + 1)[0]  # only "blue" fits
    assert cut[2].sum() == 1 and cut[1].sum() == n_prompt + 1


def test_the_loss_is_hugging_faces_with_the_prompt_masked_out(tiny_llama):
    from fedlora.causal import CausalLM, prompt, tokenize_instructions
    from fedlora.hf import load_causal_lm

    rows = examples(6)
    x = torch.from_numpy(tokenize_instructions([prompt(e["instruction"], e["input"], None) for e in rows],
                                               [e["response"] for e in rows], str(tiny_llama), 64))
    model = CausalLM(load_causal_lm(str(tiny_llama), seed=0)).eval()
    labels = torch.where(x[:, 2].bool(), x[:, 0], torch.full_like(x[:, 0], -100))
    with torch.no_grad():
        loss_sum, correct, n = model.scores(x)
        theirs = model.model(input_ids=x[:, 0], attention_mask=x[:, 1], labels=labels).loss
    assert n == int(x[:, 2].sum()) and 0 <= correct <= n
    assert float(loss_sum) / n == pytest.approx(float(theirs), rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["model.task=causal_lm"], "model.task=causal_lm tunes on instructions: use dataset=hf"),
    (["dataset=hf", "dataset.path=/tmp", "model.task=causal_lm", "adapter=lora"], "needs model.hf=ID_OR_PATH"),
    (["model.task=translation"], "model.task must be classification or causal_lm"),
    (["eval.generate=true"], "eval.generate=true generates answers: it is for model.task=causal_lm"),
])
def test_causal_lm_config_mistakes_are_named(extra, message):
    with pytest.raises(ConfigError, match=message):
        resolve(compose(extra))


def test_a_bad_template_and_a_label_partition_are_refused(tiny_llama, instructions):
    for template in ("'Q: {question}'", "'{input.foo}'", "'only {input}'"):
        with pytest.raises(ConfigError, match=r"dataset.template must hold \{instruction\}, may hold \{input\}"):
            resolve(compose(overrides(tiny_llama, instructions, f"dataset.template={template}")))
    with pytest.raises(ConfigError, match="instructions have none: use partition=iid"):
        resolve(compose(overrides(tiny_llama, instructions, "partition=label_count")))


def test_an_encoder_is_refused_as_a_causal_lm_and_so_is_a_length_that_leaves_no_response(tiny_llama, instructions):
    from fedlora.hf import MINILM, load_causal_lm, model_path
    from fedlora.preflight import preflight

    with pytest.raises(ConfigError, match="is not causal: its predictions at a position change with the tokens after"):
        load_causal_lm(model_path(MINILM), seed=0, num_layers=1)
    with pytest.raises(ConfigError, match="model=minilm is a classifier's encoder"):
        resolve(compose(["dataset=hf", f"dataset.path={instructions}", "model=minilm", "model.task=causal_lm",
                         "adapter=lora", "partition=iid"]))
    from fedlora.errors import DataError

    with pytest.raises(DataError, match="no train example keeps a token of its response"):
        preflight(resolve(compose(overrides(tiny_llama, instructions, "model.max_length=20"))))


def test_a_2_round_federated_run_lowers_the_held_out_loss_and_exports_for_peft(tiny_llama, instructions,
                                                                                ray_address, tmp_path):
    from peft import PeftModel

    from fedlora.causal import prompt, tokenize_instructions
    from fedlora.hf import load_causal_lm
    from fedlora.checkpoint import read_checkpoint
    from fedlora.methods import make_method
    from fedlora.simulation import run_simulation

    cfg = resolve(compose(overrides(tiny_llama, instructions, "eval.generate=true", "eval.generate_examples=10",
                                    f"simulation.ray_address={ray_address}")))
    assert list(cfg.adapter.train) == []  # a causal LM has no new head to train
    run_simulation(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = metrics_rows(tmp_path)
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2]
    initial = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())["initial"]["test_loss"]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] < initial
    assert rows[-1]["test_perplexity"] == pytest.approx(np.exp(rows[-1]["test_loss"]), rel=1e-6)
    assert all(0 <= r["test_exact_match"] <= 1 for r in rows)

    # the exported adapter, on a fresh copy of the base model, computes the global model's logits
    method = make_method(cfg)
    model = method.initial_model()
    saved = read_checkpoint(tmp_path)
    method.load(model, saved.arrays, saved.round, required=method.global_keys(model))
    rows_x = examples(4, seed=9)
    x = torch.from_numpy(tokenize_instructions([prompt(e["instruction"], e["input"], None) for e in rows_x],
                                               [e["response"] for e in rows_x], str(tiny_llama), 64))
    ours = model.eval()(x)
    peft = PeftModel.from_pretrained(load_causal_lm(str(tiny_llama), seed=3), str(tmp_path / "adapter")).eval()
    longest = int(x[:, 1].sum(dim=1).max())
    with torch.no_grad():
        theirs = peft(input_ids=x[:, 0, :longest], attention_mask=x[:, 1, :longest]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_exact_match_counts_the_answers_that_greedy_generation_gives_whole(tiny_llama):
    """A tiny Llama trained (all its weights, centrally) until it knows the colours answers them all;
    the same prompts with other responses match none; an example cut short is not counted."""
    from fedlora.causal import CausalLM, exact_match, prompt, tokenize_instructions
    from fedlora.hf import load_causal_lm

    rows = [{"instruction": f"What colour is the {t} ?", "input": "", "response": c} for t, c in sorted(COLOURS.items())]
    prompts, answers = [prompt(r["instruction"], "", None) for r in rows], [r["response"] for r in rows]
    x = torch.from_numpy(tokenize_instructions(prompts, answers, str(tiny_llama), 64))
    model = CausalLM(load_causal_lm(str(tiny_llama), seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        model.train()
        loss, _, n = model.scores(x)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    end = model.model.config.eos_token_id
    assert exact_match(model, x, end, 8) == (1.0, 12)
    wrong = [answers[(i + 1) % 12] if answers[(i + 1) % 12] != a else "purple" for i, a in enumerate(answers)]
    assert exact_match(model, torch.from_numpy(tokenize_instructions(prompts, wrong, str(tiny_llama), 64)), end, 8)[0] == 0
    lengths = x[:, 1].sum(dim=1)
    cut = torch.from_numpy(tokenize_instructions(prompts, answers, str(tiny_llama), int(lengths.min()) - 1))
    assert exact_match(model, cut, end, 8)[1] == 0  # no end token fits: nothing to count
