import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import make_modelscope, make_motion_adapter, make_sd, make_sdxl  # noqa: E402


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
def embedded_model():
    """The shipped image model, loaded once for every test that samples with it."""
    from sc_app.models import load_model

    return load_model("embedded", device="cpu")


@pytest.fixture(scope="session")
def sdxl_model(sdxl_folder):
    from sc_app.models import load_model

    return load_model(str(sdxl_folder), device="cpu")


# Tiny video models: module-scoped, as each test module samples with them on its own.


@pytest.fixture(scope="module")
def modelscope_folder(sd_folder, tmp_path_factory):
    return make_modelscope(tmp_path_factory.mktemp("modelscope"), sd_folder)


@pytest.fixture(scope="module")
def motion_folder(tmp_path_factory):
    return make_motion_adapter(tmp_path_factory.mktemp("motion"))


@pytest.fixture(scope="module")
def modelscope_model(modelscope_folder):
    from sc_app.video import load_video_model

    return load_video_model(str(modelscope_folder), device="cpu")


@pytest.fixture(scope="module")
def animatediff_model(sd_folder, motion_folder):
    from sc_app.video import load_video_model

    return load_video_model(str(sd_folder), motion_adapter=str(motion_folder), device="cpu")


@pytest.fixture(params=["modelscope", "animatediff"])
def video_model(request):
    """Each test that takes it runs on both video UNet layouts."""
    return request.getfixturevalue(f"{request.param}_model")
