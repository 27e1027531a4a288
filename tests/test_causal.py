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


def _model_and_batch(tiny_llama, instructions, *extra):
    from fedlora.federated_data import client_tensors
    from fedlora.methods import make_method

    cfg = resolve(compose(overrides(tiny_llama, instructions, *extra)))
    x, y = client_tensors(cfg, 0)
    model = make_method(cfg).initial_model()
    for name, p in model.named_parameters():  # B away from zero: A's gradient is not zero either
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)
    return model, x[:8], y[:8]


def _loss_and_grads(model, x, y):
    from fedlora.training import mean_loss

    model.train()
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        loss, _ = mean_loss(model, x, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_recomputes_the_same_loss_and_gradients(tiny_llama, instructions):
    plain, x, y = _model_and_batch(tiny_llama, instructions)
    ckpt, _, _ = _model_and_batch(tiny_llama, instructions, "model.gradient_checkpointing=true")
    assert ckpt.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    assert ckpt.model.config.use_cache is False
    ckpt.load_state_dict(plain.state_dict())
    loss_a, grads_a = _loss_and_grads(plain, x, y)
    loss_b, grads_b = _loss_and_grads(ckpt, x, y)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert all(g.abs().sum() > 0 for n, g in grads_a.items() if n.endswith(("lora_A", "lora_B")))
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_bf16_runs_as_is_on_a_cpu_and_in_autocast_where_it_applies(tiny_llama, instructions):
    """model.precision=bf16: on this CPU the model runs in float32 (the same logits); where autocast
    applies (a GPU; here the CPU, asked for), the projections compute in bf16, the weights stay float32
    and the loss is close to float32's."""
    from fedlora import precision

    plain, x, y = _model_and_batch(tiny_llama, instructions)
    half, _, _ = _model_and_batch(tiny_llama, instructions, "model.precision=bf16")
    half.load_state_dict(plain.state_dict())
    assert half.precision == "bf16"
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), half.eval()(x), rtol=0, atol=0)
    seen = []
    hook = half.model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.no_grad(), precision.autocast(torch.device("cpu"), "bf16", devices=("cpu",)):
        loss_half = half.scores(x, y)[0].item()
    hook.remove()
    loss_full = plain.scores(x, y)[0].item()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    assert loss_half == pytest.approx(loss_full, rel=0.02) and loss_half != loss_full


@pytest.mark.parametrize("extra, message", [
    (["model.precision=fp8"], "model.precision must be fp32, bf16 or fp16"),
    (["model.precision=fp16", "dp.noise_multiplier=1.0"], "use model.precision=bf16 with dp.where=client"),
])
def test_precision_mistakes_are_named(tiny_llama, instructions, extra, message):
    with pytest.raises(ConfigError, match=message):
        resolve(compose(overrides(tiny_llama, instructions, *extra)))
    with pytest.raises(ConfigError, match="are for pretrained models with an adapter"):
        resolve(compose(["model.gradient_checkpointing=true"]))


def test_packing_keeps_every_example_whole_and_its_loss_that_of_the_unpacked_batch(tiny_llama, instructions):
    """model.packing: whole examples, in order, as many to a row as fit, positions starting again at
    each; the tiny Llama keeps them apart (check_packing), so a packed batch's summed loss, correct
    predictions and target count are the unpacked batch's."""
    from fedlora.causal import check_packing, pack

    model, x, y = _model_and_batch(tiny_llama, instructions, "model.max_length=160")  # ~45 tokens an example
    packed = pack(x)
    sizes = x[:, 1].sum(dim=1).tolist()
    assert packed.shape[1:] == (4, x.shape[2]) and len(packed) < len(x)
    assert packed[:, 1].sum().item() == sum(sizes) and packed[:, 2].sum().item() == x[:, 2].sum().item()
    tokens = [t for row in packed for t in row[0][row[1].bool()].tolist()]
    assert tokens == [t for row in x for t in row[0][row[1].bool()].tolist()]  # every token, in order
    starts = [(row[3] == 0).nonzero().flatten().tolist() for row in packed]
    assert sum(len([s for s in st if s < int(row[1].sum())]) for st, row in zip(starts, packed)) == len(x)
    check_packing(model, str(tiny_llama))
    model.eval()
    with torch.no_grad():
        loss_a, correct_a, n_a = model.scores(x, y)
        loss_b, correct_b, n_b = model.scores(packed, y[:len(packed)])
    assert (correct_a, n_a) == (correct_b, n_b) and n_a > 0
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    # a tiny OPT does not keep packed examples apart by their position ids: refused
    from transformers import OPTConfig, OPTForCausalLM

    from fedlora.causal import CausalLM

    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, ffn_dim=64,
                                   vocab_size=50, word_embed_proj_dim=32))
    with pytest.raises(ConfigError, match="lets a packed example see the one before it"):
        check_packing(CausalLM(opt), "tiny-opt")


def test_a_packed_run_with_gradient_checkpointing_lowers_the_held_out_loss(tiny_llama, instructions, ray_address,
                                                                           tmp_path):
    from fedlora.simulation import run_simulation

    cfg = resolve(compose(overrides(tiny_llama, instructions, "model.packing=true", "model.gradient_checkpointing=true",
                                    "model.max_length=128", f"simulation.ray_address={ray_address}")))
    run_simulation(cfg, tmp_path)
    rows = metrics_rows(tmp_path)
    initial = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())["initial"]["test_loss"]
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["test_loss"] < rows[0]["test_loss"] < initial
    with pytest.raises(ConfigError, match="it is for model.task=causal_lm"):
        resolve(compose(["model=minilm", "dataset=agnews", "adapter=lora", "method=fedit", "model.packing=true"]))


def test_the_alpaca_preset_passes_its_checks_with_a_local_model_and_file(tiny_llama, tmp_path):
    """experiment=alpaca_smollm2 names Hub ids (it needs internet); with a local model and an
    Alpaca-style file (its `output` column) in their place it passes the checks before Ray, packing's
    among them."""
    from fedlora.preflight import preflight

    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"instruction": e["instruction"], "input": e["input"], "output": e["response"]})
                            + "\n" for e in examples(120, seed=2)))
    cfg = resolve(compose(["experiment=alpaca_smollm2", "method=fedit", f"model.hf={tiny_llama}",
                           f"dataset.path={path}", "model.max_length=128"]))
    assert cfg.model.packing and cfg.dataset.response == "output" and cfg.eval.generate
    preflight(cfg)
