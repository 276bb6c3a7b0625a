"""Config loading: defaults, dotted overrides, one-line errors, YAML round trip, shipped configs, README reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Config, load_config, parse_overrides, reference_markdown, to_yaml
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ["model.path=/models/m", "data.train.path=data/train.jsonl"]


def _error(path=None, overrides=()) -> str:
    """Load a config that must fail; return the UserError message after checking it is one line."""
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


# ---------------------------------------------------------------- valid configs and defaults


def test_minimal_config_has_documented_defaults():
    cfg = load_config(None, MINIMAL)
    assert isinstance(cfg, Config)
    assert cfg.model.path == "/models/m"
    assert cfg.model.revision is None
    assert cfg.model.dtype == "float32"
    assert cfg.model.trust_remote_code is False
    assert cfg.tokenizer.path is None  # documented: defaults to model.path
    assert cfg.tokenizer.chat_template is None  # documented: the tokenizer's own
    assert cfg.data.train.path == "data/train.jsonl"
    assert cfg.data.train.format == "auto"
    assert cfg.data.train.split == "train"
    assert cfg.data.train.subset is None
    assert cfg.data.train.limit is None
    assert cfg.data.eval is None
    assert cfg.data.max_length == 512
    assert cfg.data.max_prompt_length == 256
    assert cfg.data.implicit_prompt_marker == "\n\nAssistant:"
    ref = cfg.scoring
    assert (ref.engine, ref.num_actors, ref.batch_size, ref.shard_size) == ("vllm", 1, 64, 512)
    assert (ref.tensor_parallel_size, ref.use_gpu, ref.num_cpus_per_actor) == (1, False, 1.0)
    assert (ref.gpu_memory_utilization, ref.cpu_kv_cache_gb, ref.engine_kwargs) == (0.3, 1, {})
    assert cfg.ray.address is None and cfg.ray.num_cpus is None
    assert cfg.cache_dir == "cache"
    assert cfg.run_dir == "runs/default"


def test_minimal_yaml_file_loads(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: /models/m\ndata:\n  train:\n    path: t.jsonl\n")
    cfg = load_config(f)
    assert cfg.model.path == "/models/m"
    assert cfg.data.train.path == "t.jsonl"
    assert cfg.data.max_length == 512


def test_defaults_appear_in_reference_table():
    table = reference_markdown()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "512" in rows["`data.max_length`"]
    assert "256" in rows["`data.max_prompt_length`"]
    assert "'vllm'" in rows["`scoring.engine`"]
    assert "required" in rows["`model.path`"]
    assert "required" in rows["`data.train.path`"]
    assert "`'runs/default'`" in rows["`run_dir`"]
    # every leaf key is documented
    for line in table.splitlines()[2:]:
        assert line.count("|") >= 5 and line.rstrip("|").split("|")[-1].strip(), line
    # a section used twice is listed once; the second place names the first (the eval split: data.train's keys)
    assert "`data.eval.path`" not in rows and "`data.train.*`" in rows["`data.eval`"]
    assert "`eval.reward.*`" in rows["`pairs.reward`"] and "`pairs.reward.model`" not in rows


def test_overrides_are_yaml_typed():
    cfg = load_config(None, MINIMAL + [
        "data.max_length=1024",  # int
        "data.max_prompt_length=100",
        "scoring.use_gpu=true",  # bool
        "model.trust_remote_code=yes",  # YAML 1.1 bool
        "scoring.num_cpus_per_actor=0.5",  # float
        "tokenizer.path=/tok",  # string
        "ray.address=auto",
        "data.train.limit=7",
        "data.train.format=implicit",  # nested section value
        "data.train.split=test",
        "scoring.engine=hf",
        "scoring.engine_kwargs={enforce_eager: true, max_num_seqs: 4}",  # flow mapping
    ])
    assert cfg.data.max_length == 1024 and isinstance(cfg.data.max_length, int)
    assert cfg.data.max_prompt_length == 100
    assert cfg.scoring.use_gpu is True
    assert cfg.model.trust_remote_code is True
    assert cfg.scoring.num_cpus_per_actor == 0.5
    assert cfg.tokenizer.path == "/tok"
    assert cfg.ray.address == "auto"
    assert cfg.data.train.limit == 7
    assert cfg.data.train.format == "implicit"
    assert cfg.data.train.split == "test"
    assert cfg.data.train.path == "data/train.jsonl"  # sibling keys of an overridden nested key survive
    assert cfg.scoring.engine == "hf"
    assert cfg.scoring.engine_kwargs == {"enforce_eager": True, "max_num_seqs": 4}


def test_override_null_resets_an_optional_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: m\n  revision: main\ndata:\n  train: {path: t.jsonl}\n  eval: {path: e.jsonl}\n"
                 "ray:\n  num_cpus: 4\n")
    cfg = load_config(f)
    assert cfg.model.revision == "main" and cfg.data.eval.path == "e.jsonl" and cfg.ray.num_cpus == 4
    cfg = load_config(f, ["model.revision=null", "data.eval=null", "ray.num_cpus=~"])
    assert cfg.model.revision is None
    assert cfg.data.eval is None
    assert cfg.ray.num_cpus is None


def test_overrides_win_over_file_and_merge_into_sections(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: m\n  dtype: bfloat16\ndata:\n  train:\n    path: t.jsonl\n    limit: 3\n"
                 "  max_length: 64\n  max_prompt_length: 32\n")
    cfg = load_config(f, ["data.train.limit=5", "model.path=other"])
    assert cfg.data.train.limit == 5
    assert cfg.data.train.path == "t.jsonl"
    assert cfg.model.path == "other"
    assert cfg.model.dtype == "bfloat16"
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (64, 32)


def test_override_can_create_optional_section():
    cfg = load_config(None, MINIMAL + ["data.eval.path=e.jsonl", "data.eval.format=conversational"])
    assert cfg.data.eval is not None
    assert cfg.data.eval.path == "e.jsonl"
    assert cfg.data.eval.format == "conversational"
    assert cfg.data.eval.split == "train"


def test_parse_overrides_nests_and_keeps_strings_with_equals():
    tree = parse_overrides(["a.b.c=1", "a.b.d=x=y", "e=", "f=[1, 2]"])
    assert tree == {"a": {"b": {"c": 1, "d": "x=y"}}, "e": "", "f": [1, 2]}


def test_inline_chat_template_override_is_kept_as_text():
    tmpl = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    cfg = load_config(None, MINIMAL + [f"tokenizer.chat_template={tmpl}"])
    assert cfg.tokenizer.chat_template == tmpl


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("override, key, suggestion", [
    ("scorng.engine=hf", "scorng", "did you mean 'scoring'"),
    ("data.trian.path=x", "data.trian", "did you mean 'data.train'"),
    ("data.max_lenght=5", "data.max_lenght", "did you mean 'data.max_length'"),
    ("scoring.batchsize=4", "scoring.batchsize", "did you mean 'scoring.batch_size'"),
    ("data.train.limt=3", "data.train.limt", "did you mean 'data.train.limit'"),
    ("data.eval.pth=e.jsonl", "data.eval.pth", "did you mean 'data.eval.path'"),
])
def test_unknown_key_names_it_and_suggests_close_match(override, key, suggestion):
    msg = _error(overrides=MINIMAL + [override])
    assert f"'{key}'" in msg
    assert suggestion in msg


def test_unknown_key_replacing_a_required_one_is_named_first():
    # `data.trian` also leaves `data.train` missing; the typo is the real problem and must be what we report.
    msg = _error(overrides=["model.path=m", "data.trian.path=x"])
    assert "'data.trian'" in msg
    assert "did you mean 'data.train'" in msg


def test_unknown_key_without_close_match_lists_allowed_keys():
    msg = _error(overrides=MINIMAL + ["scoring.zzzzzz=1"])
    assert "'scoring.zzzzzz'" in msg
    assert "batch_size" in msg and "engine" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: m\ndata:\n  train:\n    path: t.jsonl\nscorng:\n  engine: hf\n")
    msg = _error(f)
    assert "'scorng'" in msg and "did you mean 'scoring'" in msg


@pytest.mark.parametrize("old, value, new", [
    ("reference.engine", "hf", "scoring"),
    ("train.reference", "in_loop", "train.ref_logps"),
    ("train.num_workers", "2", "train.parallel.num_workers"),
    ("train.lr", "1e-5", "train.optim.lr"),
    ("train.checkpoint_every", "5", "train.checkpoint.every"),
    ("train.keep_checkpoints", "2", "train.checkpoint.keep"),
    ("train.max_failures", "1", "train.checkpoint.max_failures"),
    ("eval.include_reference", "false", "eval.include_reference_model"),
    ("eval.baseline", "chosen", "eval.win_rate_baseline"),
])
def test_renamed_key_names_its_new_key(old, value, new):
    msg = _error(overrides=[*MINIMAL, f"{old}={value}"])
    assert f"'{old.split('.')[0] if new == 'scoring' else old}' was renamed to '{new}'" in msg


def test_renamed_key_in_yaml_file_names_its_new_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: m\ndata:\n  train:\n    path: t.jsonl\ntrain:\n  lr: 1.0e-5\n  epochs: 2\n")
    assert _error(f) == ("config key 'train.lr' was renamed to 'train.optim.lr'; use 'train.optim.lr' in the config "
                         "file and overrides (README: Configuration reference)")


@pytest.mark.parametrize("override, key", [
    ("data.max_length=abc", "data.max_length"),
    ("scoring.engine=foo", "scoring.engine"),
    ("scoring.num_actors=-1", "scoring.num_actors"),
    ("scoring.num_actors=0", "scoring.num_actors"),
    ("scoring.batch_size=1.5", "scoring.batch_size"),
    ("scoring.gpu_memory_utilization=1.5", "scoring.gpu_memory_utilization"),
    ("model.dtype=float64", "model.dtype"),
    ("data.train.format=csv", "data.train.format"),
    ("data.train.limit=0", "data.train.limit"),
    ("scoring.use_gpu=maybe", "scoring.use_gpu"),
])
def test_wrong_type_or_value_names_the_key(override, key):
    msg = _error(overrides=MINIMAL + [override])
    assert f"'{key}'" in msg


@pytest.mark.parametrize("overrides", [
    ["data.max_length=128", "data.max_prompt_length=128"],
    ["data.max_length=128", "data.max_prompt_length=200"],
    ["data.max_prompt_length=512"],  # equal to the default max_length
])
def test_prompt_length_must_be_below_max_length(overrides):
    msg = _error(overrides=MINIMAL + overrides)
    assert "max_prompt_length" in msg
    assert "max_length" in msg


def test_prompt_length_just_below_max_length_is_fine():
    cfg = load_config(None, MINIMAL + ["data.max_length=128", "data.max_prompt_length=127"])
    assert cfg.data.max_prompt_length == 127


@pytest.mark.parametrize("overrides, key", [
    (["data.train.path=t.jsonl"], "model"),
    (["model.dtype=float32", "data.train.path=t.jsonl"], "model.path"),
    (["model.path=m"], "data"),
    (["model.path=m", "data.max_length=64"], "data.train"),
    (["model.path=m", "data.train.format=standard"], "data.train.path"),
])
def test_missing_required_key_is_named(overrides, key):
    msg = _error(overrides=overrides)
    assert f"'{key}'" in msg
    assert "required" in msg


def test_empty_yaml_file_reports_missing_keys(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing here\n")
    msg = _error(f)
    assert "required" in msg


def test_config_file_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _error(missing)
    assert str(missing) in msg
    assert "not found" in msg


def test_config_file_is_a_directory(tmp_path):
    msg = _error(tmp_path)
    assert str(tmp_path) in msg


def test_yaml_syntax_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  path: [unclosed\ndata: {\n")
    msg = _error(f)
    assert str(f) in msg
    assert "YAML" in msg


@pytest.mark.parametrize("text", ["- model\n- data\n", "just a string\n", "42\n"])
def test_yaml_top_level_must_be_a_mapping(tmp_path, text):
    f = tmp_path / "list.yaml"
    f.write_text(text)
    msg = _error(f)
    assert str(f) in msg
    assert "mapping" in msg


@pytest.mark.parametrize("override", ["novalue", "=x", ""])
def test_malformed_override(override):
    msg = _error(overrides=MINIMAL + [override])
    assert "KEY=VALUE" in msg


def test_override_into_a_value_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: m\ndata:\n  train:\n    path: t.jsonl\n")
    msg = _error(f, ["model.path.sub=1"])
    assert "'model.path'" in msg


# ---------------------------------------------------------------- round trip and shipped configs


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(None, MINIMAL + [
        "model.dtype=bfloat16", "model.revision=main", "tokenizer.path=/tok",
        "tokenizer.chat_template={{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "data.eval.path=e.parquet", "data.eval.split=test", "data.eval.subset=default", "data.train.limit=10",
        "data.train.format=implicit", "data.max_length=300", "data.max_prompt_length=100",
        "scoring.engine=hf", "scoring.num_actors=3", "scoring.use_gpu=true",
        "scoring.num_cpus_per_actor=2.5", "scoring.engine_kwargs={enforce_eager: true, seed: 3}",
        "ray.address=auto", "cache_dir=/tmp/c", "run_dir=runs/x",
    ])
    # a marker with newlines, quotes and non-ASCII must survive the YAML dump
    cfg.data.implicit_prompt_marker = "\n\nAssistent: « ' \" »"
    text = to_yaml(cfg)
    f = tmp_path / "resolved.yaml"
    f.write_text(text)
    again = load_config(f)
    assert again == cfg
    assert again.data.implicit_prompt_marker == "\n\nAssistent: « ' \" »"
    assert again.scoring.engine_kwargs == {"enforce_eager": True, "seed": 3}
    # and a default config too
    plain = load_config(None, MINIMAL)
    f.write_text(to_yaml(plain))
    assert load_config(f) == plain


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").glob("**/*.yaml"))
    assert files, "no YAML files under configs/"
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, Config), f
        assert cfg.model.path and cfg.data.train.path, f


def test_readme_contains_config_reference():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    table = reference_markdown()
    assert table.strip(), "empty reference table"
    assert table in readme.read_text(), "README.md's configuration reference is stale: paste the output of " \
                                        "`dpo-pipeline config-docs`"


def test_relative_dirs_are_refused_in_a_ray_job(monkeypatch, capsys, tmp_path):
    from pipeline.cli import main
    from pipeline.config.loading import RAY_JOB_ENV

    model = ["model.path=/models/m", "data.train.path=/data/pairs.jsonl"]
    assert load_config(None, model).cache_dir == "cache"  # outside a job: relative to where it runs
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_1"}}))
    with pytest.raises(UserError, match="cache_dir 'cache' and run_dir 'runs/x': a relative path in a Ray job "
                                        r"\(raysubmit_1\)"):
        load_config(None, [*model, "run_dir=runs/x"])
    with pytest.raises(UserError, match=r"^run_dir 'runs/x': .* set an absolute path every node shares, or a URI"):
        load_config(None, [*model, "cache_dir=s3://bucket/cache", "run_dir=runs/x"])
    cfg = load_config(None, [*model, "cache_dir=s3://bucket/cache", "run_dir=/shared/runs/x"])
    assert (cfg.cache_dir, cfg.run_dir) == ("s3://bucket/cache", "/shared/runs/x")
    # The command line: one line, exit code 2.
    config = tmp_path / "job.yaml"
    config.write_text("model: {path: /models/m}\ndata: {train: {path: /data/pairs.jsonl}}\n")
    capsys.readouterr()
    assert main(["config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cache_dir 'cache' and run_dir 'runs/default': a relative path") and \
        err.count("\n") == 1, err
