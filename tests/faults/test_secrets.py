"""Case 8: secrets. A credential in the config (a URI's user:password or query, a token, a secret-named setting)
is refused with one line that does not show it; credentials from the environment never reach a log, manifest or
resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import copy_cache, make_config

HF_TOKEN = "hf_" + "Q" * 34
AWS_KEY_ID = "AKIA" + "Z" * 16
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "SECRETSECRET"
SECRET_ENV = {"HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": HF_TOKEN, "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
              "AWS_SECRET_ACCESS_KEY": AWS_SECRET}


@pytest.mark.parametrize("override, key, what", [
    (f"cache_dir=s3://{AWS_KEY_ID}:{AWS_SECRET}@bucket/cache", "cache_dir", "a user:password in a URI"),
    (f"run_dir=s3://bucket/run?access_key={AWS_KEY_ID}&secret_key={AWS_SECRET}", "run_dir",
     "a credential in a URI's query"),
    (f"eval.engine_kwargs={{hf_token: {HF_TOKEN}}}", "eval.engine_kwargs.hf_token", "a secret-named setting"),
    (f"model.revision={HF_TOKEN}", "model.revision", "a Hugging Face token"),
    (f"eval.reward.kwargs={{key: {AWS_KEY_ID}}}", "eval.reward.kwargs.key", "an AWS access key id"),
])
def test_a_credential_in_the_config_is_refused_without_showing_it(override, key, what, capsys, tmp_path):
    code = main(["config", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", override])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"error: config key '{key}' holds {what}" in err and "set credentials in the environment" in err
    for secret in (HF_TOKEN, AWS_KEY_ID, AWS_SECRET):
        assert secret not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.ray  # the session's tiny cache, which `plan` finds and describes
def test_credentials_from_the_environment_are_shown_nowhere(tiny_model, tmp_path, standard_cache, capsys,
                                                            monkeypatch):
    """`config` and `plan` with credentials in the environment print none of them. Whole runs with them (the cache
    driver and the Ray workers it starts, which inherit the environment) write none to any file or output: the
    full-disk scenario runs so (tests/faults/test_storage_errors.py, extended tier)."""
    copy_cache(standard_cache, tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(make_config(tiny_model, tmp_path, "scoring.engine=hf").model_dump(mode="json")))
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    assert main(["config", str(cfg_file)]) == 0 and main(["plan", str(cfg_file)]) == 0
    out = "".join(capsys.readouterr())
    assert "cache/train" in out and "reuse" in out  # the plan found the cache
    written = [out] + [f.read_text(errors="replace") for f in Path(tmp_path).rglob("*") if f.is_file()
                       and f.suffix in (".json", ".jsonl", ".yaml", ".log", ".txt", "")]
    assert any("manifest" in f.name for f in Path(tmp_path).rglob("*.json"))  # the manifest is among them
    for text in written:
        for secret in SECRET_ENV.values():
            assert secret not in text
