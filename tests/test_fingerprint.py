"""The cache key changes when, and only when, an input that determines the cached values changes.

`stages.cache.prepare` only resolves and hashes files (no Ray, no engine), so every case here is cheap. Tests that
modify model files work on a copy of the session's tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import datasets
import pytest
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pipeline.caches import layout as cache_layout
from pipeline.caches.layout import CacheSpec
from pipeline.data.models import load_tokenizer
from pipeline.store.fingerprint import cache_key, model_files_hash, tokenizer_files_hash
from tests.conftest import DATA, make_config

TEMPLATE_B = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model directory, free to modify."""
    dst = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model, dst)
    return dst


HAS_VLLM = importlib.util.find_spec("vllm") is not None


def prep(model_dir: Path, tmp_path: Path, *overrides: str, data: str | Path = DATA / "standard.jsonl"):
    # engine=hf: this tier must not need vLLM
    cfg = make_config(model_dir, tmp_path, "scoring.engine=hf", *overrides, data=data)
    return cache_layout.resolve_inputs(CacheSpec.of(cfg), "train", cfg.data.train)


def components(p) -> dict:
    """The hashed parts of CacheInputs.inputs (paths are for people and not keyed)."""
    out = json.loads(json.dumps(p.inputs))
    for part in ("model", "tokenizer", "data"):
        out[part].pop("path")
    return out


# ---------------------------------------------------------------- basics


def test_key_is_deterministic_and_derived_from_inputs(model, tmp_path):
    a, b = prep(model, tmp_path), prep(model, tmp_path)
    assert a.key == b.key
    assert len(a.key) == 20 and int(a.key, 16) >= 0
    assert a.key == cache_key(components(a))
    assert a.inputs["model"]["path"] == str(model)
    assert a.inputs["data"]["rows"] == 24


def test_model_and_tokenizer_hashes_cover_the_right_files(model):
    """Model hash: config + weights; tokenizer hash: tokenizer files. Neither depends on the directory's path."""
    m0, t0 = model_files_hash(model), tokenizer_files_hash(model)
    assert m0 != t0
    other = model.parent / "other"
    shutil.copytree(model, other)
    assert (model_files_hash(other), tokenizer_files_hash(other)) == (m0, t0)


# ---------------------------------------------------------------- changes the key


def test_weights_change_key(model, tmp_path):
    before = prep(model, tmp_path)
    f = model / "model.safetensors"
    tensors = load_file(str(f))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, str(f), metadata={"format": "pt"})
    after = prep(model, tmp_path)
    assert after.key != before.key
    assert after.inputs["model"] != before.inputs["model"]
    assert after.inputs["tokenizer"] == before.inputs["tokenizer"]
    assert after.inputs["chat_template_sha256"] == before.inputs["chat_template_sha256"]


def test_model_config_change_changes_key(model, tmp_path):
    before = prep(model, tmp_path)
    conf = json.loads((model / "config.json").read_text())
    conf["rms_norm_eps"] = conf.get("rms_norm_eps", 1e-6) * 10
    (model / "config.json").write_text(json.dumps(conf, indent=2))
    after = prep(model, tmp_path)
    assert after.key != before.key
    assert after.inputs["model"] != before.inputs["model"]
    assert after.inputs["tokenizer"] == before.inputs["tokenizer"]


def test_new_weight_shard_changes_key(model, tmp_path):
    before = prep(model, tmp_path)
    shutil.copy(model / "model.safetensors", model / "extra.safetensors")
    assert prep(model, tmp_path).key != before.key


def test_tokenizer_vocab_change_changes_key_not_model(model, tmp_path):
    before = prep(model, tmp_path)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    n = tok.get_vocab_size()
    assert tok.add_tokens(["zebrafish"]) == 1
    tok.save(str(model / "tokenizer.json"))
    assert Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size() == n + 1
    after = prep(model, tmp_path)
    assert after.key != before.key
    assert after.inputs["tokenizer"] != before.inputs["tokenizer"]
    assert after.inputs["model"] == before.inputs["model"]
    assert after.inputs["chat_template_sha256"] == before.inputs["chat_template_sha256"]


def test_tokenizer_config_change_changes_key_not_model(model, tmp_path):
    before = prep(model, tmp_path)
    conf = json.loads((model / "tokenizer_config.json").read_text())
    conf["model_max_length"] = 2048
    (model / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))
    after = prep(model, tmp_path)
    assert after.key != before.key
    assert after.inputs["tokenizer"] != before.inputs["tokenizer"]
    assert after.inputs["model"] == before.inputs["model"]


def test_inline_chat_template_changes_only_the_template_component(model, tmp_path):
    before = prep(model, tmp_path)
    after = prep(model, tmp_path, f"tokenizer.chat_template={TEMPLATE_B}")
    assert after.chat_template == TEMPLATE_B
    assert after.key != before.key
    assert after.inputs["chat_template_sha256"] != before.inputs["chat_template_sha256"]
    assert after.inputs["model"] == before.inputs["model"]
    assert after.inputs["tokenizer"] == before.inputs["tokenizer"]
    assert {k: v for k, v in components(after).items() if k != "chat_template_sha256"} == \
           {k: v for k, v in components(before).items() if k != "chat_template_sha256"}


def test_chat_template_file_override_same_as_inline(model, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE_B)
    inline = prep(model, tmp_path, f"tokenizer.chat_template={TEMPLATE_B}")
    from_file = prep(model, tmp_path, f"tokenizer.chat_template={f}")
    assert from_file.key == inline.key


def test_override_equal_to_own_template_keeps_key(model, tmp_path):
    own = (model / "chat_template.jinja").read_text()
    assert prep(model, tmp_path, f"tokenizer.chat_template={own}").key == prep(model, tmp_path).key


def test_edited_chat_template_file_changes_only_the_template_component(model, tmp_path):
    """Two copies of the model, one with an edited chat_template.jinja."""
    edited = model.parent / "edited"
    shutil.copytree(model, edited)
    (edited / "chat_template.jinja").write_text(TEMPLATE_B)
    a, b = prep(model, tmp_path), prep(edited, tmp_path)
    assert b.key != a.key
    assert b.inputs["chat_template_sha256"] != a.inputs["chat_template_sha256"]
    assert components(b)["model"] == components(a)["model"]
    assert components(b)["tokenizer"] == components(a)["tokenizer"]


def test_chat_template_edited_in_place_changes_key(model, tmp_path):
    """The same directory, before and after editing its chat_template.jinja, in one process."""
    before = prep(model, tmp_path)
    (model / "chat_template.jinja").write_text(TEMPLATE_B)
    after = prep(model, tmp_path)
    assert after.inputs["chat_template_sha256"] != before.inputs["chat_template_sha256"]
    assert after.key != before.key
    assert after.inputs["model"] == before.inputs["model"]
    assert after.inputs["tokenizer"] == before.inputs["tokenizer"]


def test_tokenizer_edited_in_place_is_reloaded(model):
    """The tokenizer used to tokenize must match the files the key hashed, even in a long-lived process."""
    before = load_tokenizer(str(model))
    assert load_tokenizer(str(model)) is before  # loaded once while the files stay the same
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.add_tokens(["zebrafish"])
    tok.save(str(model / "tokenizer.json"))
    after = load_tokenizer(str(model))
    assert len(after) == len(before) + 1
    assert after("zebrafish", add_special_tokens=False).input_ids == [len(before)]
    (model / "chat_template.jinja").write_text(TEMPLATE_B)
    assert load_tokenizer(str(model)).chat_template == TEMPLATE_B


def test_named_chat_templates_are_template_not_model(model, tmp_path):
    """transformers saves extra named templates as additional_chat_templates/<name>.jinja."""
    extra = model / "additional_chat_templates"
    extra.mkdir()
    (extra / "tool_use.jinja").write_text("{{ 'tools' }}")
    before = prep(model, tmp_path)
    (extra / "tool_use.jinja").write_text("{{ 'other tools' }}")
    after = prep(model, tmp_path)
    assert after.inputs["chat_template_sha256"] != before.inputs["chat_template_sha256"]
    assert after.inputs["model"] == before.inputs["model"]
    assert after.inputs["tokenizer"] == before.inputs["tokenizer"]


def test_data_content_change_changes_key(model, tmp_path):
    a = tmp_path / "a.jsonl"
    shutil.copy(DATA / "standard.jsonl", a)
    before = prep(model, tmp_path, data=a)
    data = bytearray(a.read_bytes())
    i = data.index(b"wonderful")
    data[i] = ord("W")
    a.write_bytes(bytes(data))
    after = prep(model, tmp_path, data=a)
    assert after.key != before.key
    assert after.inputs["data"]["sha256"] != before.inputs["data"]["sha256"]
    assert after.inputs["model"] == before.inputs["model"]


@pytest.mark.parametrize("override", [
    "data.max_length=129",
    "data.max_prompt_length=63",
    "model.dtype=bfloat16",
    "model.dtype=float16",
    "data.train.limit=5",
    "data.implicit_prompt_marker=ASSISTANT",
])
def test_truncation_dtype_and_limit_change_key(model, tmp_path, override):
    assert prep(model, tmp_path, override).key != prep(model, tmp_path).key


# ---------------------------------------------------------------- does not change the key


def test_moving_or_copying_the_model_keeps_key(model, tmp_path):
    before = prep(model, tmp_path)
    copy = tmp_path / "elsewhere" / "copy-of-tiny"
    shutil.copytree(model, copy)
    assert prep(copy, tmp_path).key == before.key
    moved = tmp_path / "moved" / "tiny2"
    moved.parent.mkdir()
    shutil.move(str(model), str(moved))
    after = prep(moved, tmp_path)
    assert after.key == before.key
    assert after.inputs["model"]["path"] == str(moved)  # recorded for people, not keyed


def test_moving_the_data_keeps_key(model, tmp_path):
    a = tmp_path / "x" / "a.jsonl"
    b = tmp_path / "y" / "renamed.jsonl"
    a.parent.mkdir()
    b.parent.mkdir()
    shutil.copy(DATA / "standard.jsonl", a)
    shutil.copy(DATA / "standard.jsonl", b)
    assert prep(model, tmp_path, data=a).key == prep(model, tmp_path, data=b).key == prep(model, tmp_path).key


def test_separate_tokenizer_path_to_identical_copy_keeps_key(model, tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(model, tok_dir)
    assert prep(model, tmp_path, f"tokenizer.path={tok_dir}").key == prep(model, tmp_path).key


@pytest.mark.parametrize("override", [
    pytest.param("scoring.engine=vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")),
    "scoring.batch_size=3",
    "scoring.shard_size=1",
    "scoring.shard_size=1000",
    "scoring.num_actors=4",
    "scoring.tensor_parallel_size=2",
    "scoring.use_gpu=true",
    "scoring.gpu_memory_utilization=0.9",
    "scoring.engine_kwargs={enforce_eager: true}",
    "ray.num_cpus=3",
    "model.revision=main",  # ignored for local directories
    "data.train.limit=1000",  # more than the file has: same rows
])
def test_execution_settings_keep_key(model, tmp_path, override):
    assert prep(model, tmp_path, override).key == prep(model, tmp_path).key


def test_run_dir_and_cache_dir_keep_key(model, tmp_path):
    a = prep(model, tmp_path)
    b = prep(model, tmp_path, f"run_dir={tmp_path / 'other-run'}", f"cache_dir={tmp_path / 'other-cache'}")
    assert a.key == b.key


def test_source_key_independent_of_cache_dir_and_of_how_the_file_is_named(model, tmp_path):
    rows = [json.loads(line) for line in (DATA / "standard.jsonl").read_text().splitlines() if line.strip()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    a = prep(model, tmp_path, f"cache_dir={tmp_path / 'c1'}", data=tmp_path / "ds")
    b = prep(model, tmp_path, f"cache_dir=file://{tmp_path}/c2", data=tmp_path / "ds")
    assert a.key == b.key and a.inputs["data"]["rows"] == len(rows)
    assert a.plan.path.startswith(f"{tmp_path}/c1/sources/") and b.plan.path.startswith(f"file://{tmp_path}/c2/sources/")
    assert prep(model, tmp_path, data=f"file://{DATA / 'standard.jsonl'}").key == prep(model, tmp_path).key


@pytest.mark.parametrize("name, content", [
    ("README.md", "# tiny model\nedited docs\n"),
    ("generation_config.json", '{"temperature": 0.1, "do_sample": true}\n'),
    ("LICENSE", "Apache-2.0\n"),
    (".gitattributes", "*.safetensors filter=lfs\n"),
])
def test_docs_and_generation_defaults_keep_key(model, tmp_path, name, content):
    before = prep(model, tmp_path)
    (model / name).write_text(content)
    assert prep(model, tmp_path).key == before.key
