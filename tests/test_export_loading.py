"""One loader: every entry point takes a pruned export (either allocation), and a bad pruning.json says what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BPE_VOCAB, tiny_batches, tiny_bpe_tokenizer, tiny_model, tiny_tokenizer

from rku_lightning import StructuredPruner, compact, load_causal_lm, save_pruned
from rku_lightning.pruning.plan import PlanError


def export(tmp_path, family: str = "qwen2", allocation: str = "global", sparsity: float = 0.4, bpe: bool = False):
    """A pruned tiny export; `bpe`: with the byte-level BPE tokenizer that GGUF export accepts."""
    model = tiny_model(family, max_position_embeddings=1024, **({"vocab_size": BPE_VOCAB} if bpe else {}))
    pruner = StructuredPruner(model, allocation=allocation, progress=False)
    pruner.calibrate(tiny_batches())
    pruner.prune(sparsity)
    plan = compact(model)
    out = save_pruned(model, tiny_bpe_tokenizer() if bpe else tiny_tokenizer(tmp_path), tmp_path / "export")
    return model, plan, out


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_load_causal_lm_takes_exports(family, allocation, tmp_path):
    model, plan, out = export(tmp_path, family, allocation)
    assert plan["uniform_shapes"] == (allocation == "uniform")
    loaded, tokenizer = load_causal_lm(out)
    batch = tiny_batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-6)
    assert loaded.rku_pruning_plan["layers"] == plan["layers"] and tokenizer.padding_side == "left"


def test_prune_cli_prunes_an_export_again_against_the_dense_model(tmp_path, shared_data):
    from rku_lightning.cli.prune import main

    _, _, first = export(tmp_path, sparsity=0.2, bpe=True)
    dense_decoder = sum(p.numel() for p in tiny_model("qwen2").model.layers.parameters())
    report = main(["--model", str(first), "--sparsity", "0.5", "--importance", "magnitude", "--out", str(tmp_path / "again")])
    assert report["decoder_params_before"] == dense_decoder
    assert report["sparsity"] == pytest.approx(0.5, abs=0.02)
    again, _ = load_causal_lm(tmp_path / "again")
    assert sum(p.numel() for p in again.model.layers.parameters()) == report["decoder_params_after"]
    plan = json.loads((tmp_path / "again" / "pruning.json").read_text())
    assert [r["target_sparsity"] for r in plan["rounds"]] == [0.2, 0.5]
    assert plan["source_model"] == str(first)
    gguf = tmp_path / "again.gguf"
    main(["--model", str(first), "--sparsity", "0.5", "--importance", "magnitude", "--out", str(gguf), "--format", "gguf"])
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_evaluate_cli_and_training_module_take_exports(tmp_path, shared_data):
    from rku_lightning.cli.evaluate import main
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    model, _, out = export(tmp_path)
    report = tmp_path / "report.json"
    argv = ["--model", str(out), "--data", str(shared_data / "gsm8k" / "test.jsonl"), "--limit", "2",
            "--no-generate", "--json", str(report), "--no-progress"]
    assert main(argv) == 0
    assert json.loads(report.read_text())["metrics"]["cot_nll_reasoning"] is not None
    module = CausalLMPruningModule(pretrained=str(out), generate=False)
    assert [layer.mlp.down_proj.in_features for layer in module.model.model.layers] == [
        layer.mlp.down_proj.in_features for layer in model.model.layers
    ]


def edit_plan(out, edit) -> None:
    """Edit the plan as an older export (no `layers_sha256` digest) would be: the structural checks must catch it."""
    path = out / "pruning.json"
    plan = json.loads(path.read_text())
    plan.pop("layers_sha256", None)
    edit(plan)
    path.write_text(json.dumps(plan))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["layers"][1]["mlp_channels"].append(64), r"layer 1 field 'mlp_channels': index 64 is outside \[0, 64\)"),
        (lambda p: p["layers"][0]["heads"].reverse(), r"layer 0 field 'heads': indices must be strictly increasing"),
        (lambda p: p["layers"].pop(), r"field 'layers': has 1 entries, original.num_hidden_layers is 2"),
        (lambda p: p["original"].update(num_key_value_heads=0), r"original.num_key_value_heads: must be a positive integer"),
        (lambda p: p.update(uniform_shapes=True), r"field 'uniform_shapes'"),
        (lambda p: p["layers"][0].update(kv_groups=[1], heads=[0, 1, 2]), r"layer 0 field 'heads': head 0 belongs to KV group 0"),
    ],
)
def test_edited_plans_are_refused_naming_layer_and_field(tmp_path, edit, message):
    _, _, out = export(tmp_path)
    edit_plan(out, edit)
    with pytest.raises(PlanError, match=message):
        load_causal_lm(out)


def test_a_plan_that_does_not_match_the_weights_names_the_layer(tmp_path):
    _, plan, out = export(tmp_path)
    other = next(i for i, layer in enumerate(plan["layers"]) if len(layer["mlp_channels"]) > 1)

    def drop_channel(p):
        p["layers"][other]["mlp_channels"].pop()

    edit_plan(out, drop_channel)
    with pytest.raises(PlanError, match=rf"layer {other} field 'mlp_channels': the safetensors hold model.layers.{other}.mlp"):
        load_causal_lm(out)


def test_a_uniform_plan_must_match_its_config(tmp_path):
    _, _, out = export(tmp_path, allocation="uniform")
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] += 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match="config.json intermediate_size"):
        load_causal_lm(out)
