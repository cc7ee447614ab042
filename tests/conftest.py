import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import make_sd, make_sdxl  # noqa: E402


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    return make_sd(tmp_path_factory.mktemp("sd15"), "epsilon")


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory) -> Path:
    return make_sd(tmp_path_factory.mktemp("sd21"), "v_prediction")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    return make_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def sd_model(sd_folder):
    from sc_app.models import load_model
    return load_model(str(sd_folder), device="cpu")


@pytest.fixture(scope="session")
def sdxl_model(sdxl_folder):
    from sc_app.models import load_model
    return load_model(str(sdxl_folder), device="cpu")
