import pytest

from tests.gcs import Emulator


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """gcp-storage-emulator over HTTP, for the GCS store and gs:// weights."""
    emulator = Emulator(tmp_path_factory.mktemp("gcs")).start()
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_env(emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    return emulator
