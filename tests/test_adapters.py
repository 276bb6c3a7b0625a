"""LoRA adapter checkpoints without Ray or vLLM: listing, hashing, reading, the base-model and vLLM checks, and the
evaluation's refusals (one line each)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from pipeline.data.adapters import base_mismatch, read_adapter
from pipeline.demo.tiny import TinyModelSpec, build_tiny_assets
from pipeline.engines.lora import LoraEngine, serving_problem
from pipeline.errors import UserError
from pipeline.store.checkpoints import RECORD, checkpoint_hash, is_adapter, list_checkpoints
from pipeline.store.fingerprint import combine_file_hashes, model_files_hash, sha256_file
from pipeline.store.storage import Store, local_copy
from stages.evaluate import select_targets
from tests.adapter_fixtures import make_adapter
from tests.conftest import make_config


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """A run with a full checkpoint, two adapters (one with a merged model beside it) and an unfinished export."""
    run = tmp_path_factory.mktemp("run")
    ckpts = run / "checkpoints"
    full = ckpts / "step_000001"
    shutil.copytree(tiny_model, full)
    a2 = make_adapter(tiny_model, ckpts / "step_000002", rank=4, seed=2)
    a3 = make_adapter(tiny_model, ckpts / "step_000003", rank=8, seed=3, targets=("q_proj", "v_proj"),
                      rank_pattern={"v_proj": 12})
    shutil.copytree(tiny_model, a3 / "merged")  # train.lora.merge's merged model (here: any full model)
    unfinished = ckpts / "step_000004"
    unfinished.mkdir()
    shutil.copy(a2 / "adapter_model.safetensors", unfinished)  # adapter_config.json, written last, missing
    return dict(run=run, full=full, a2=a2, a3=a3)


def test_adapters_are_listed_and_told_from_full_models(adapters):
    run = adapters["run"]
    assert [Path(c).name for c in list_checkpoints(Store(str(run)))] == ["step_000001", "step_000002",
                                                                         "step_000003"]
    assert not is_adapter(adapters["full"]) and is_adapter(adapters["a2"]) and is_adapter(adapters["a3"])
    assert not is_adapter(adapters["a3"] / "merged")


def test_adapter_hash_is_its_own_files(adapters, tmp_path):
    a3 = shutil.copytree(adapters["a3"], tmp_path / "step_000003")
    # The hash of the adapter's config and weights, in name order; tokenizer, README and merged/ not part of it.
    expected = combine_file_hashes({n: sha256_file(a3 / n) for n in
                                    ("adapter_config.json", "adapter_model.safetensors")})
    assert model_files_hash(a3, top_level=True) == expected
    assert checkpoint_hash(str(a3)) == expected  # the recorded one
    (a3 / RECORD).unlink()
    assert checkpoint_hash(str(a3)) == expected  # computed: the merged model beside it is not read
    assert checkpoint_hash(str(adapters["a2"])) != expected


def test_read_adapter_from_the_weights_header(adapters):
    info = read_adapter(str(adapters["a3"]))
    assert info.rank == 12  # rank_pattern's v_proj rank
    assert info.module_names == ("q_proj", "v_proj")
    q = next(p for p in info.pairs if p.module == "model.layers.0.self_attn.q_proj")
    v = next(p for p in info.pairs if p.module == "model.layers.0.self_attn.v_proj")
    assert (q.in_features, q.out_features, q.rank) == (64, 64, 8) and (v.out_features, v.rank) == (32, 12)
    assert info.base is not None and serving_problem(info) is None
    assert LoraEngine.serving([info, read_adapter(str(adapters["a2"]))]) == LoraEngine(
        12, ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"))


def test_adapters_vllm_cannot_serve_exactly_are_named(tiny_model, tmp_path):
    cases = {"modules_to_save": dict(modules_to_save=["lm_head"]), "DoRA": dict(use_dora=True),
             "LoRA on lm_head": dict(targets=("q_proj", "lm_head"))}
    for i, (expected, kwargs) in enumerate(cases.items()):
        info = read_adapter(str(make_adapter(tiny_model, tmp_path / f"a{i}", rank=4, seed=i,
                                             **{"targets": ("q_proj",), **kwargs})))
        assert expected in serving_problem(info), (expected, serving_problem(info))
    # LoRA on embed_tokens is served (peft saves the embedding's base weights beside it: not a problem).
    info = read_adapter(str(make_adapter(tiny_model, tmp_path / "emb", rank=4, seed=9,
                                         targets=("q_proj", "embed_tokens"))))
    assert serving_problem(info) is None and "embed_tokens" in info.module_names


def test_base_model_mismatch(adapters, tiny_model, tmp_path):
    info = read_adapter(str(adapters["a2"]))
    assert base_mismatch(info, str(tiny_model), str(tiny_model)) is None
    # Another architecture: the adapter's layers have other shapes.
    wide = build_tiny_assets(tmp_path / "wide", TinyModelSpec(hidden_size=128, num_heads=4))
    assert "maps 128 -> 64 features, the base model's 128 -> 128" in base_mismatch(info, str(wide), str(wide))
    # Same architecture, other weights: told apart by the recorded base directory, when it exists here.
    other = build_tiny_assets(tmp_path / "other", TinyModelSpec(seed=1))
    assert "whose weights differ" in base_mismatch(info, str(other), str(other))
    moved = dataclasses.replace(info, base="/elsewhere/base-model")  # trained on another machine: shapes only
    assert base_mismatch(moved, str(other), str(other)) is None


def test_eval_refuses_a_foreign_or_unservable_adapter_in_one_line(adapters, tiny_model, tmp_path):
    other = build_tiny_assets(tmp_path / "other", TinyModelSpec(seed=1))
    cfg = make_config(other, tmp_path, f"eval.checkpoints=[{adapters['a2']}]")
    with pytest.raises(UserError) as e:
        select_targets(cfg)
    assert "is not a LoRA adapter of model.path" in str(e.value) and "set model.path" in str(e.value)
    assert "\n" not in str(e.value)
    dora = make_adapter(tiny_model, tmp_path / "dora", rank=4, seed=1, targets=("q_proj",), use_dora=True)
    with pytest.raises(UserError, match=r"vLLM cannot evaluate exactly \(DoRA \(use_dora\)\); evaluate its merged"):
        select_targets(make_config(tiny_model, tmp_path, f"eval.checkpoints=[{dora}]"))
    cfg = make_config(tiny_model, tmp_path, f"run_dir={adapters['run']}")
    targets = {t.name: t for t in select_targets(cfg)}
    assert targets["step_000001"].adapter is None and targets["step_000002"].adapter.rank == 4
    assert all(t.error is None for t in targets.values())


def test_a_broken_adapter_fails_alone(adapters, tiny_model, tmp_path):
    broken = shutil.copytree(adapters["a2"], tmp_path / "step_000009")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    cfg = make_config(tiny_model, tmp_path, f"eval.checkpoints=[{broken}]", "eval.include_reference_model=false")
    [target] = select_targets(cfg)
    assert "corrupt weights file adapter_model.safetensors" in target.error


def test_adapter_at_a_uri_is_copied_without_its_merged_model(adapters, s3):
    run = Store(f"{s3}/adapters")
    run.upload_dir(adapters["a3"], "checkpoints/step_000003", last="adapter_config.json")
    uri = f"{run.uri}/checkpoints/step_000003"
    assert list_checkpoints(run) == [uri] and is_adapter(uri)
    assert read_adapter(uri).rank == 12  # the header read in place
    local = Path(local_copy(uri, top_level=True))
    assert not (local / "merged").exists() and (local / "adapter_model.safetensors").is_file()
    run.delete(f"checkpoints/step_000003/{RECORD}")
    assert checkpoint_hash(uri) == model_files_hash(adapters["a3"], top_level=True)
