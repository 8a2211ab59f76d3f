"""What the test run itself does to the machine (tests/conftest.py): the disk it needs and the caches it keeps."""

from conftest import STARTING_VERBOSITY, emptied_if_over, lack_of_space
from transformers.utils import logging as transformers_logging


def test_compile_cache_is_emptied_above_its_limit(tmp_path):
    folder = tmp_path / "torchinductor"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "graph").write_bytes(b"x" * 600)
    (folder / "kernel").write_bytes(b"x" * 400)
    assert emptied_if_over(folder, 1000) == folder and (folder / "a" / "graph").exists()  # (1000 bytes: kept)
    (folder / "kernel").write_bytes(b"x" * 401)
    assert emptied_if_over(folder, 1000) == folder and not folder.exists()
    assert emptied_if_over(folder, 1000) == folder  # (none yet: nothing to do)


def test_a_run_needs_room_in_its_temporary_folder(tmp_path):
    assert lack_of_space(tmp_path, 1) is None
    message = lack_of_space(tmp_path / "not" / "yet", 2**60)  # (the disk of its nearest existing parent)
    assert message.startswith(f"the tests need 1073741824 GiB free in the temporary folder {tmp_path / 'not' / 'yet'}")
    assert "TMPDIR" in message


def test_a_test_may_change_transformers_verbosity():
    # (as the examples do when a test runs them in-process)
    transformers_logging.set_verbosity_info()
    assert transformers_logging.get_verbosity() == transformers_logging.INFO != STARTING_VERBOSITY


def test_the_next_test_starts_at_the_verbosity_the_run_started_with():
    # (the test above runs first: pytest keeps a file's order)
    assert transformers_logging.get_verbosity() == STARTING_VERBOSITY
