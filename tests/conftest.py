import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

DATA = Path(__file__).parent / 'data'

# Under pytest-xdist (`make test` runs one worker per core) each worker uses one thread: the many small models of
# the suite parallelise far better across processes than inside one op.
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else min(2, os.cpu_count() or 1))


def load_parity(name: str) -> dict:
    """A reference file produced by the official implementation (see tests/data/PARITY_README.md)."""
    return torch.load(DATA / name, weights_only=True)


def parity_input(ref: dict) -> torch.Tensor:
    return ref['input'].float() * ref['input_scale']


def load_tool(name: str) -> ModuleType:
    """A script of tools/ imported as a module (tools/ is no package), e.g. ``load_tool('export').check_compile``."""
    spec = importlib.util.spec_from_file_location(f'_vitzoo_tool_{name}', DATA.parents[1] / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def official_file(tmp_path):
    """Write a state_dict in the official checkpoint format ({'model': ...}) and return its path."""
    def write(state_dict: dict, wrap: str = 'model') -> str:
        path = tmp_path / 'official.pth'
        torch.save({wrap: state_dict} if wrap else state_dict, path)
        return str(path)
    return write
