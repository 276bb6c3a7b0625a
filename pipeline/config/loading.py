"""Loading a config: YAML file + dotted command-line overrides -> a validated `Config`.

Unknown keys, renamed keys, wrong types, impossible values and credentials are `UserError`s with one line naming the
key and the fix. `reference_markdown` renders the schema's field docs into the README's configuration reference.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.root import Config
from pipeline.errors import UserError

# Keys that have moved (old dotted key -> new dotted key): a config that still uses one gets a one-line error naming
# the new key, rather than "unknown key".
RENAMED = {
    "reference": "scoring",
    "train.reference": "train.ref_logps",
    **{f"train.{k}": f"train.parallel.{k}" for k in ("num_workers", "use_gpu", "num_cpus_per_worker", "param_dtype",
                                                    "activation_checkpointing", "cpu_offload", "compile")},
    **{f"train.{k}": f"train.optim.{k}" for k in ("lr", "weight_decay", "warmup_steps", "schedule",
                                                 "max_grad_norm")},
    "train.checkpoint_every": "train.checkpoint.every",
    "train.keep_checkpoints": "train.checkpoint.keep",
    "train.max_failures": "train.checkpoint.max_failures",
    "eval.include_reference": "eval.include_reference_model",
    "eval.baseline": "eval.win_rate_baseline",
}


def _renamed_key(data: dict[str, Any]) -> str | None:
    """The one-line error for the first renamed key in a raw config tree, or None."""
    for old, new in RENAMED.items():
        *parents, last = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            return (f"config key '{old}' was renamed to '{new}'; use '{new}' in the config file and overrides "
                    f"(README: Configuration reference)")
    return None



def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict. Values are parsed as YAML scalars/flow values (`1`, `true`, `[1, 2]`)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not KEY=VALUE; write e.g. model.path=/models/my-model")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{prefix}{key}.")
        elif isinstance(value, dict) and key in out and out[key] is not None:
            raise UserError(f"config key '{prefix}{key}' is a value, not a section; override it as {prefix}{key}=...")
        else:
            out[key] = value
    return out


def models_in(ann: Any) -> list[type[BaseModel]]:
    """The config sections a field's annotation holds (through Optional, unions, Annotated and lists)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in models_in(a)]


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names allowed at the section `loc` points into (for 'did you mean')."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        candidates = models_in(field.annotation)
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _one_line(err: ValidationError) -> str:
    errors = err.errors()
    # An unknown key usually also makes its intended key "missing": name the typo, it is the real problem.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    # Union branches add their tag (`term`/`terms` of train.loss) or validator to the location: not config keys.
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and (p in ("term", "terms") or "[" in p)))
    key = ".".join(str(p) for p in loc)
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else \
            f"allowed here: {', '.join(allowed)}"
        return f"unknown config key '{key}': {hint}{more}"
    if first["type"] == "missing":
        return f"config key '{key}' is required: set it in the YAML file or pass {key}=VALUE{more}"
    if first["type"] == "value_error":  # our validators' messages name their fix
        msg = first["msg"].removeprefix("Value error, ")
        return f"config key '{key}': {msg}{more}" if key else f"invalid config: {msg}{more}"
    got = first.get("input")
    if first["type"] in ("model_type", "dict_type") and not isinstance(got, dict):
        return f"config key '{key}' is a section: write it as a mapping of its keys, not {got!r}{more}"
    got = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = first["msg"].replace("Input should", "should", 1)
    return f"config key '{key}' {msg}{got}: set {key}=VALUE or fix it in the config file{more}"


# Credentials never belong in a config: it is written to the run directory (config.yaml) and its paths to logs,
# manifests and reports. Tokens and keys come from the environment (HF_TOKEN, AWS_*, GOOGLE_APPLICATION_CREDENTIALS).
_SECRETS = [
    (re.compile(r"://[^/\s@?#:]+:[^\s@?#]*@"), "a user:password in a URI"),
    (re.compile(r"[?&](access_key|secret_key|session_token|token|password|api_key|sig|signature|"
                r"x-amz-credential|x-amz-signature)=", re.I), "a credential in a URI's query"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), "a Hugging Face token"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,})"), "an API token"),
]
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|apikey|credentials?)(_|$)|api_key|access_key", re.I)


def _find_secret(node: Any, key: str = "") -> tuple[str, str] | None:
    """(config key, what) of the first credential in a raw config tree, or None."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v:
                return sub, "a secret-named setting"
            found = _find_secret(v, sub)
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _find_secret(v, f"{key}[{i}]")
            if found:
                return found
    elif isinstance(node, str):
        return next(((key, what) for pattern, what in _SECRETS if pattern.search(node)), None)
    return None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or nothing), apply dotted overrides, validate strictly."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(path)!r} not found; pass the path of a YAML file such as "
                            f"configs/tiny.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {str(path)!r} is not valid YAML{where}: fix the syntax there") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {str(path)!r} must be a YAML mapping (key: value), not a "
                            f"{type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    renamed = _renamed_key(data)
    if renamed:
        raise UserError(renamed)
    secret = _find_secret(data)
    if secret:  # the value is not shown: it is the secret
        raise UserError(f"config key '{secret[0]}' holds {secret[1]}, which would be written to the resolved "
                        f"config and logs; remove it and set credentials in the environment instead (HF_TOKEN; "
                        f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; GOOGLE_APPLICATION_CREDENTIALS)")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(e)) from None
    _refuse_job_relative_dirs(cfg)
    return cfg


# Set by Ray for the driver of a job (`ray job submit`): its config, with the submission id in the metadata.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _refuse_job_relative_dirs(cfg: Config) -> None:
    """A Ray job's driver runs in the job's uploaded working directory, a new one whenever the upload changes: a
    relative cache_dir or run_dir there would hide the cache and checkpoints from the job's next submission."""
    try:
        job = json.loads(os.environ.get(RAY_JOB_ENV) or "{}").get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        job = None
    relative = [k for k in ("cache_dir", "run_dir") if "://" not in getattr(cfg, k) and
                not os.path.isabs(getattr(cfg, k))]
    if job and relative:
        raise UserError(f"{' and '.join(f'{k} {getattr(cfg, k)!r}' for k in relative)}: a relative path in a Ray "
                        f"job ({job}) resolves inside the job's uploaded working directory, which the next "
                        f"submission does not see; set an absolute path every node shares, or a URI "
                        f"(s3://bucket/prefix)")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def reference_markdown() -> str:
    """The configuration reference table (README), generated from the field descriptions."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    walked: dict[type[BaseModel], str] = {}  # a section listed once; a second place names the first

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            subs = models_in(ann)
            key = f"{prefix}{name}"
            if subs and subs[0] in walked:
                rows.append(f"| `{key}` | section | `{field.default!r}` | {field.description} Its keys are those of "
                            f"`{walked[subs[0]]}`. |")
                continue
            if subs:
                walked[subs[0]] = f"{key}.*"
                walk(subs[0], key + ".")
                continue
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = f"`{field.default_factory()!r}`"
            else:
                default = f"`{field.default!r}`"
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("|", "\\|")
            rows.append(f"| `{key}` | `{type_name}` | {default} | {field.description} |".replace("\n", "\\n"))

    walk(Config, "")
    return "\n".join(rows) + "\n"
