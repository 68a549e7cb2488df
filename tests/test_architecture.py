"""The house rules of DESIGN.md, checked on the source: layers import only torch; models never import integrations."""
import ast
from pathlib import Path

import vitzoo
import vitzoo.utils

PKG = Path(vitzoo.__file__).parent


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_layers_import_only_torch_and_stdlib():
    for path in sorted((PKG / 'layers').glob('*.py')):
        for mod in _imports(path):
            top = mod.split('.')[0]
            assert top not in {'timm', 'mmdet', 'mmseg', 'mmengine', 'mmcv', 'diffusers', 'transformers', 'numpy'}, \
                f'{path.name} imports {mod}'


def test_models_do_not_import_integrations():
    for path in sorted((PKG / 'models').glob('*.py')):
        for mod in _imports(path):
            assert not mod.startswith(('mmdet', 'mmseg', 'mmengine', 'diffusers', 'vitzoo.mmdet', 'vitzoo.mmseg',
                                       'vitzoo.diffusers')), f'{path.name} imports {mod}'


def test_version_and_registration():
    assert isinstance(vitzoo.__version__, str) and vitzoo.__version__.count('.') == 2
    assert vitzoo.utils.list_models('agent_deit_*')


def test_project_files_name_no_development_paths():
    """A user's clone has neither the development machines' folders nor their private notes: cite public sources."""
    root = PKG.parent
    bad = ('/work/', '../shared', 'shared/specs', 'specs/', 'ENVIRONMENT.md')
    offenders = []
    for folder in ('vitzoo', 'tools', 'tests', 'configs', 'weights', 'scripts'):
        for path in sorted((root / folder).rglob('*')):
            if path.suffix not in {'.py', '.yaml', '.yml', '.md', '.sh', '.json', '.cfg', '.txt'} \
                    or path == Path(__file__).resolve():
                continue
            text = path.read_text(errors='replace')
            offenders += [f'{path.relative_to(root)}: {b}' for b in bad if b in text]
    for name in ('README.md', 'setup.cfg', 'Makefile', 'pyproject.toml'):
        text = (root / name).read_text()
        offenders += [f'{name}: {b}' for b in bad if b in text]
    assert not offenders, offenders
