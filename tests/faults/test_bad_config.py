"""Case 2: a bad config (unknown key, wrong type, impossible value, missing path) is one line naming the key and
the fix, exit code 2, never a traceback, and nothing is started or written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import main
from tests.faults.helpers import ROOT, assert_user_error, cli


def run_main(capsys, *argv: str):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("override, needle", [
    # unknown keys
    ("data.trian.path=x", "unknown config key 'data.trian': did you mean 'data.train'?"),
    ("trainer.lr=1", "unknown config key 'trainer': did you mean 'train'?"),
    ("train.learning_rate=1", "unknown config key 'train.learning_rate'"),
    # wrong types
    ("train.optim.lr=fast", "config key 'train.optim.lr' should be a valid number"),
    ("train.parallel.num_workers=1.5", "config key 'train.parallel.num_workers' should be a valid integer"),
    ("train=5", "config key 'train' is a section"),
    ("scoring.engine=gpu", "config key 'scoring.engine' should be 'vllm' or 'hf'"),
    # impossible values
    ("train.loss.beta=-0.1", "config key 'train.loss.beta' should be greater than 0 (got -0.1): set "
                             "train.loss.beta=VALUE"),
    ("train.global_batch_pairs=6", "global_batch_pairs (6) must be a multiple of micro_batch_pairs × num_workers "
                                   "(4); change train.global_batch_pairs"),
    ("data.max_prompt_length=128", "max_prompt_length (128) must be smaller than max_length (128); lower "
                                   "data.max_prompt_length or raise data.max_length"),
    ("eval.top_p=0", "config key 'eval.top_p' should be greater than 0"),
    ("bad-override", "is not KEY=VALUE"),
])
def test_config_errors_are_one_line_with_key_and_fix(override, needle, capsys, tmp_path):
    code, out, err = run_main(capsys, "cache", "configs/tiny.yaml", "train.parallel.num_workers=2",
                              f"cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", override)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_model_path_that_does_not_exist(capsys, tmp_path):
    code, _, err = run_main(capsys, "cache", "configs/tiny.yaml", f"model.path={tmp_path / 'nope'}",
                            f"cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and err.count("\n") == 1
    assert f"model.path '{tmp_path / 'nope'}' does not exist; point it at a model directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, "cache", "configs/tiny.yaml", f"model.path={tmp_path / 'empty'}")
    assert code == 2 and "has no config.json; point it at a Hugging Face model directory" in err


def test_unknown_key_in_the_yaml_file(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {train: {path: t.jsonl}}\ntrain: {los: {beta: 0.1}}\n")
    code, _, err = run_main(capsys, "train", str(f))
    assert code == 2 and "unknown config key 'train.los': did you mean 'train.loss'?" in err


# The real command line, in a subprocess: the exit code and stderr a user sees.

@pytest.mark.parametrize("overrides, needle", [
    (["data.trian.path=x"], "unknown config key 'data.trian': did you mean 'data.train'?"),
    (["model.path=/no/such/model"], "model.path '/no/such/model' does not exist"),
    (["data.train.path=/no/such.jsonl"], "data file '/no/such.jsonl' not found"),
])
@pytest.mark.subprocess
def test_user_errors_exit_2_with_one_line(overrides, needle, tiny_model):
    # Later overrides win, so each case's override replaces the valid tiny model path where it names one.
    assert_user_error(cli("cache", "configs/tiny.yaml", f"model.path={tiny_model}", *overrides), needle)


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["cache", "train", "run"])
def test_a_wrong_path_is_reported_before_the_stage_is_imported(command, tiny_model):
    """The command line checks the model path and the local data files before it imports a stage (torch, Ray,
    transformers: ~8 s here): the error comes back at once."""
    probe = ("import sys; from pipeline.cli import main; code = main(sys.argv[1:]); "
             "print(code, *(m in sys.modules for m in ('torch', 'ray', 'stages.cache', 'stages.train')))")
    for override in ("model.path=/no/such/model", "data.train.path=/no/such.jsonl"):
        proc = subprocess.run([sys.executable, "-c", probe, command, "configs/tiny.yaml", f"model.path={tiny_model}",
                               override], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.stdout.split() == ["2", "False", "False", "False", "False"], (override, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("overrides, needle", [
    (["eval.checkpoints=every:0"], "checkpoints must be all, last, every:K"),
    (["eval.reward.type=callable"], "reward type 'callable' needs eval.reward.function"),
    (["eval.preference_accuracy=false"], "no checkpoints in"),
    ([], "no complete reference cache for the eval split"),  # preference accuracy needs the eval cache
])
@pytest.mark.subprocess
def test_eval_user_errors_exit_2_with_one_line(overrides, needle, tiny_model, tmp_path):
    proc = cli("eval", "configs/tiny.yaml", f"model.path={tiny_model}", f"run_dir={tmp_path / 'run'}",
               f"cache_dir={tmp_path / 'cache'}", *overrides)
    assert_user_error(proc, needle)


@pytest.mark.subprocess
def test_missing_config_file_exits_2():
    assert_user_error(cli("cache", "no/such/config.yaml"), "config file 'no/such/config.yaml' not found")
