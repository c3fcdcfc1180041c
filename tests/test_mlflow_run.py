"""`mlflow run . -e main`: every stage of the pipeline under MLflow's project launcher, in a copy
of its own (a file of its own, so that it runs beside tests/test_e2e.py on the other worker)."""

from __future__ import annotations

import pytest
import yaml

from test_e2e import model_name, project_copy, sh, store, tool

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mlflow_main(tmp_path_factory):
    """`mlflow run . -e main --env-manager local`, with fewer trials and epochs as overrides.
    MLflow starts a project run and hands it to the commands in MLFLOW_RUN_ID."""
    dest = project_copy(tmp_path_factory.mktemp("mlflow"))
    sh(tool("mlflow"), "run", ".", "-e", "main", "--env-manager", "local",
       "-P", "overrides=tune.n_trials=2 tune.epochs=1 train.epochs=2", cwd=dest)
    return dest


def test_mlflow_run_main_gives_each_stage_its_own_run(mlflow_main):
    dest = mlflow_main
    client = store(dest)  # MLflow's default store, sqlite:///mlflow.db in the project
    (project,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    "tags.`mlflow.project.entryPoint` = 'main'")
    assert project.info.status == "FINISHED"
    experiment = client.get_experiment(project.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    def children(run_id: str) -> list:
        return client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")

    stages = children(project.info.run_id)
    (tune_run,) = [r for r in stages if "optuna.study" in r.data.tags]
    (train_run,) = [r for r in stages if "model.sha256" in r.data.tags]
    assert len(stages) == 2
    trials = children(tune_run.info.run_id)
    assert len(trials) == 2
    # train took the tuned lr into a run of its own (no clash with the params of another stage)
    best = yaml.safe_load((dest / "reports/tune/best_params.yaml").read_text())
    assert float(train_run.data.params["train.lr"]) == pytest.approx(best["lr"])
    assert train_run.data.params["train.hparams_source"] == "tune"
    assert "test/accuracy" in train_run.data.metrics  # evaluate logged onto train's run
    champion = client.get_model_version_by_alias(model_name(dest), "champion")
    assert champion.run_id == train_run.info.run_id
    head = sh("git", "rev-parse", "HEAD", cwd=dest).stdout.strip()
    for run in [project, *stages, *trials]:
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.tags["mlflow.source.git.commit"] == head, run.info.run_name
