"""The fault injector itself (pipeline/faults.py): unit tier, `action=raise` in this process."""

from __future__ import annotations

import pytest

from pipeline import faults
from tests.faults.helpers import fault


def test_each_injection_counts_its_own_reaches(tmp_path, monkeypatch):
    """Two injections at the same point, one after the other in one process (as tests in one session): the second
    fires at its own n-th reach, not at the n-th reach of the point since the process started."""
    for k in range(2):
        token = tmp_path / f"token-{k}"
        monkeypatch.setenv(faults.VAR, fault("scorer_batch", token, nth=2, action="raise"))
        faults.reach("scorer_batch")  # the first reach of this injection: nothing
        faults.reach("other_point")  # another point: not counted
        assert token.exists()
        with pytest.raises(faults.InjectedFault, match="scorer_batch"):
            faults.reach("scorer_batch")
        assert not token.exists()
        faults.reach("scorer_batch")  # the token is gone: it fired once


def test_unset_or_disarmed_reaches_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.VAR, raising=False)
    faults.reach("scorer_batch")
    assert faults.env() == {}
    monkeypatch.setenv(faults.VAR, f"point=scorer_batch,token={tmp_path / 'never-armed'},action=raise")
    faults.reach("scorer_batch")  # no token file: disarmed
    assert faults.env() == {faults.VAR: f"point=scorer_batch,token={tmp_path / 'never-armed'},action=raise"}


def test_several_injections_in_one_setting_fire_each_on_their_own(tmp_path, monkeypatch):
    """`;`-separated injections (one run, two faults): each counts its own point's reaches and fires once."""
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(faults.VAR, ";".join([fault("scorer_batch", a, nth=2, action="raise"),
                                             fault("shard_written", b, action="raise")]))
    faults.reach("scorer_batch")
    assert a.exists() and b.exists()
    with pytest.raises(faults.InjectedFault, match="shard_written"):
        faults.reach("shard_written")
    assert a.exists() and not b.exists()
    with pytest.raises(faults.InjectedFault, match="scorer_batch"):
        faults.reach("scorer_batch")
    assert not a.exists()
    faults.reach("scorer_batch")  # both fired: nothing more
    faults.reach("shard_written")
