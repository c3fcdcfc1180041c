"""The Model Registry client: registered models, versions, aliases, tags and descriptions, and
loading a registered (or logged) model. With tracking.py, the only importer of mlflow."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from reprolab.tags import MODEL_FILES, MODEL_HASH

# ---- the files of a logged model, checked where they are read ----


# what MLflow itself writes into a registered model's folder when it downloads one (its name
# and version): not a file of the model
DOWNLOAD_NOTES = ("registered_model_meta",)


def file_hashes(folder: Path) -> dict[str, str]:
    """{path relative to `folder`: sha256} of every file under it: what a registered version
    records of its model (tags.MODEL_FILES), and what every reader checks."""
    from reprolab.files import sha256_file

    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in DOWNLOAD_NOTES}


def _download(uri: str, dest: Path) -> Path:
    """The artifacts behind a model URI (`models:/m-...`, a run's) as a local folder."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def check_files(folder: Path, recorded: dict[str, str], what: str) -> None:
    """Refuse, in one line naming `what`, the file and both hashes, a model folder whose files
    are not exactly the ones recorded: changed, damaged (a flipped byte, a truncated file),
    swapped, missing or added."""
    from reprolab.errors import DataError

    found = file_hashes(folder)
    for path in sorted(set(recorded) | set(found)):
        want, have = recorded.get(path), found.get(path)
        if want == have:
            continue
        if have is None:
            problem = f"missing (registered with sha256 {want[:12]})"
        elif want is None:
            problem = f"not a file of the registered model (sha256 {have[:12]})"
        else:
            problem = (f"sha256 {have[:12]} is not the {want[:12]} recorded at registration "
                       "(changed or damaged since)")
        raise DataError(f"{what}: {path}: {problem}; refused: nothing was loaded")


def recorded_files(tags: dict[str, str], what: str, made: str = "registered"
                   ) -> dict[str, str]:
    """The file hashes a version (or a training run: `made` "trained") recorded, or one line
    saying it has none."""
    from reprolab.errors import DataError

    text = tags.get(MODEL_FILES)
    if not text:
        raise DataError(f"{what}: {made} without file hashes (before reprolab recorded them: no "
                        f"{MODEL_FILES} tag); nothing can check its bytes, so it is not used; "
                        "train and register it again")
    return json.loads(text)


def check_logged(model_uri: str, recorded: dict[str, str], what: str) -> None:
    """A logged model's files (downloaded to a temporary folder) against `recorded`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="reprolab-check-") as tmp:
        check_files(_download(model_uri, Path(tmp)), recorded, what)


def fetch_checked(version: dict[str, Any], dest: Path) -> Path:
    """A registered version's model files, downloaded into `dest` and checked against the
    hashes recorded on the version; -> the local model folder, the one to read."""
    what = f"models:/{version['name']}/{version['version']}"
    recorded = recorded_files(version["tags"], what)
    folder = _download(version["source"], dest)
    check_files(folder, recorded, what)
    return folder


def load_classifier(
    model_uri: str, allow_pickle: bool = False
) -> tuple[Any, tuple[int, ...], list[str]]:
    """-> (model, input shape C x H x W, class names) of a registered or logged model.

    A registry URI is resolved to a version once (an alias moved meanwhile changes nothing
    here); its files are downloaded and checked against the hashes recorded at registration
    before anything is read. A logged model (`models:/m-...`, `runs:/...`) is checked against
    its training run's record when the run has one; a local folder is taken as given.

    Only the pt2 format loads by default: a model in MLflow's pickle format runs code from the
    artifact when it loads, so whoever can write a registry version would run code here. MLflow
    itself allows pickle unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION says false; reprolab sets it
    for the load, and `allow_pickle` (predict --allow-pickle) opts in for a trusted registry.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="reprolab-model-") as tmp:
        if model_uri.startswith("models:/") and not model_uri.startswith("models:/m-"):
            folder = fetch_checked(registered_version(model_uri), Path(tmp))
        elif model_uri.startswith(("models:/m-", "runs:/")):
            folder = _download(model_uri, Path(tmp))
            tags = _logged_model_tags(model_uri)
            if tags.get(MODEL_FILES):
                check_files(folder, json.loads(tags[MODEL_FILES]), model_uri)
        else:
            folder = Path(model_uri)
        return _load_folder(folder, model_uri, allow_pickle)


def _logged_model_tags(model_uri: str) -> dict[str, str]:
    """The tags of a logged model (`models:/m-...`) or of the run that logged it."""
    client = MlflowClient()
    try:
        if model_uri.startswith("models:/m-"):
            return dict(client.get_logged_model(model_uri.removeprefix("models:/")).tags)
        return dict(client.get_run(model_uri.removeprefix("runs:/").split("/")[0]).data.tags)
    except MlflowException:
        return {}


def _load_folder(folder: Path, model_uri: str, allow_pickle: bool
                 ) -> tuple[Any, tuple[int, ...], list[str]]:
    from reprolab.errors import DataError

    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = str(allow_pickle).lower()
    try:
        info = mlflow.models.get_model_info(str(folder))
        if "pytorch" not in info.flavors:
            raise DataError(f"--model {model_uri}: not a PyTorch model (flavors: "
                            f"{', '.join(info.flavors)}); reprolab serves its own pt2 models")
        model = mlflow.pytorch.load_model(str(folder))
    except MlflowException as exc:
        message = str(exc).splitlines()[0]
        if "pickle" in message.lower():
            raise DataError(
                f"--model {model_uri}: saved in MLflow's pickle format, whose loading runs code "
                "from the artifact; refused. Log it with serialization_format='pt2', or, for a "
                "registry you trust, pass --allow-pickle"
            ) from None
        raise DataError(f"--model {model_uri}: {message}") from None
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous
    shape = tuple(info.signature.inputs.inputs[0].shape[1:])
    classes = (info.metadata or {}).get("classes") or []  # models logged without names
    return model, shape, classes


# ---- registered models and versions ----


def ensure_registered_model(name: str, tags: dict[str, str], description: str
                            ) -> dict[str, str]:
    """Create the registered model with `tags` and `description` unless it exists (its
    description is brought up to date); -> its tags as stored."""
    client = MlflowClient()
    with contextlib.suppress(MlflowException):  # it exists, or another process created it first
        client.create_registered_model(name, tags=tags, description=description)
    model = client.get_registered_model(name)
    if (model.description or "") != description:
        client.update_registered_model(name, description=description)
    return dict(model.tags)


def register_version(name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Register a model once: a second call for the same model file (its sha256 in `tags`)
    returns the version that has it, whichever run trained it.

    `model_uri` is the logged model's `models:/m-...` URI. A REST server refuses it as a version
    source unless the call names the logged model too (`model_id`), as mlflow.register_model does.
    """
    client = MlflowClient()
    digest = tags[MODEL_HASH]
    same = f"name = '{name}' and tags.`{MODEL_HASH}` = '{digest}'"
    for version in client.search_model_versions(same):
        return str(version.version)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags=tags, model_id=model_id
    )
    return str(version.version)


def link_logged_model(model_uri: str, name: str, version: str) -> None:
    """List the version on its logged model's page, as mlflow.register_model does (the tag
    mlflow.modelVersions: [{name, version}, ...]), so that the UI shows the logged model
    registered; idempotent (a run killed before it is mended by the next `register`)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    if not model_uri.startswith("models:/m-"):
        return
    client, model_id = MlflowClient(), model_uri.removeprefix("models:/")
    held = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    entry = {"name": name, "version": str(version)}
    if entry not in held:
        client.set_logged_model_tags(model_id,
                                     {MLFLOW_MODEL_VERSIONS: json.dumps([*held, entry])})


def model_versions(name: str) -> list[dict[str, Any]]:
    """-> every version of `name` as {version, run_id, tags}, in version order (all pages)."""
    client, token, out = MlflowClient(), None, []
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000,
                                            page_token=token)
        out += [{"version": str(v.version), "run_id": v.run_id, "tags": dict(v.tags),
                 "description": v.description or ""} for v in page]
        token = page.token
        if not token:
            return sorted(out, key=lambda v: int(v["version"]))


def registered_version(model_uri: str) -> dict[str, Any]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> {name, version, run_id, tags}."""
    from reprolab.errors import DataError

    ref = model_uri.removeprefix("models:/")
    name, at, alias = ref.partition("@")
    if not model_uri.startswith("models:/") or not (at or "/" in ref):
        raise DataError(f"{model_uri}: not a registry URI; use models:/NAME@ALIAS or "
                        "models:/NAME/VERSION")
    client = MlflowClient()
    try:
        if at:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise DataError(f"{model_uri}: {str(exc).splitlines()[0]}") from None
    return {"name": name, "version": str(version.version), "run_id": version.run_id,
            "tags": dict(version.tags), "source": version.source}


def set_alias(name: str, alias: str, version: str | None) -> bool:
    """Point `alias` at `version`; None removes the alias. -> False when the version is gone
    (another process deleted its duplicate meanwhile)."""
    client = MlflowClient()
    if version is None:
        with contextlib.suppress(MlflowException):  # no such alias: nothing to remove
            client.delete_registered_model_alias(name, alias)
        return True
    # MLflow sets an alias by a read, then an insert or an update: two processes that give a
    # model an alias for the first time at once both insert, and the store's key refuses the
    # second (a UniqueViolation). Set again, the row is there and is updated; settle_aliases
    # then reads the versions again, so a value set from an older view is written over.
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException:
        if not any(v["version"] == version for v in model_versions(name)):
            return False
        client.set_registered_model_alias(name, alias, version)  # a second refusal is raised
    return True


def delete_version(name: str, version: str) -> None:
    MlflowClient().delete_model_version(name, version)


def set_registered_model_tags(name: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, value)


def set_version_tag(name: str, version: str, key: str, value: str) -> None:
    MlflowClient().set_model_version_tag(name, version, key, value)


def set_description(name: str, version: str, text: str) -> bool:
    """-> False when the version is gone (another process deleted its duplicate meanwhile)."""
    try:
        MlflowClient().update_model_version(name, version, description=text)
    except MlflowException:
        if any(v["version"] == version for v in model_versions(name)):
            raise
        return False
    return True


def registered_model_tags(name: str) -> dict[str, str]:
    from reprolab.errors import DataError

    try:
        return dict(MlflowClient().get_registered_model(name).tags)
    except MlflowException as exc:
        raise DataError(f"registered model {name!r}: {str(exc).splitlines()[0]}") from None
