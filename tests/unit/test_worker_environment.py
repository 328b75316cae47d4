"""What a worker process may see of the supervisor's environment."""

from __future__ import annotations

from supervisor.process import worker_environment


def test_secrets_and_proxies_are_dropped_and_model_knobs_kept() -> None:
    env = worker_environment({
        "PATH": "/usr/bin", "LEMONADE_API_KEY": "secret", "OPENAI_API_KEY": "sk",
        "https_proxy": "http://proxy", "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "2",
        "HF_HOME": "/models",
    })
    assert env["PATH"] == "/usr/bin"
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == "2"
    assert env["HF_HOME"] == "/models"
    assert "LEMONADE_API_KEY" not in env and "OPENAI_API_KEY" not in env
    assert "https_proxy" not in env


def test_hub_is_offline_unless_the_user_turns_it_on() -> None:
    assert worker_environment({})["HF_HUB_OFFLINE"] == "1"
    assert worker_environment({"HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "0"


def test_data_dir_comes_from_the_supervisor_not_the_users_env() -> None:
    env = worker_environment({"LEMONADE_DATA_DIR": "/elsewhere"}, data_dir="/srv/lemonade")
    assert env["LEMONADE_DATA_DIR"] == "/srv/lemonade"
    assert "LEMONADE_DATA_DIR" not in worker_environment({"LEMONADE_DATA_DIR": "/elsewhere"})
