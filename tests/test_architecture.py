"""The layering of the package, checked on the source (ast, nothing is imported).

layers -> models -> integrations -> tools: layers import only torch and the standard library; models never import an
integration; the mm / diffusers libraries are imported only by the integrations, which the core reaches lazily; the
vitzoo module graph has no import cycle; tools and tests use the public API (no private import, no ``sys.path`` edits).

Every rule is one checker function, run once on the real tree and once on a tiny synthetic violation, so a checker
that stops seeing anything fails its own test.
"""
import ast
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Set

import pytest

import vitzoo
import vitzoo.utils

PKG = Path(vitzoo.__file__).parent
ROOT = PKG.parent

INTEGRATIONS = ('vitzoo.mm', 'vitzoo._mm', 'vitzoo._mm_seg', 'vitzoo.mmdet', 'vitzoo.mmseg', 'vitzoo.diffusers')
MM_LIBRARIES = ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'diffusers', 'transformers')
LAYER_BANNED = ('timm', 'numpy', *MM_LIBRARIES)


class Module(NamedTuple):
    source: str
    is_package: bool


Modules = Dict[str, Module]  # dotted name -> source


def _within(name: str, prefixes: Sequence[str]) -> bool:
    """Whether dotted ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == p or name.startswith(p + '.') for p in prefixes)


def load_package(root: Path = PKG) -> Modules:
    """Every module of the package at ``root``, keyed by its dotted name."""
    base = root.parent
    out = {}
    for path in sorted(root.rglob('*.py')):
        parts = path.relative_to(base).with_suffix('').parts
        is_package = parts[-1] == '__init__'
        out['.'.join(parts[:-1] if is_package else parts)] = Module(path.read_text(), is_package)
    return out


def load_files(folder: Path) -> Modules:
    """The scripts of one folder (tools/, tests/) as modules ``<folder>.<stem>``."""
    return {f'{folder.name}.{p.stem}': Module(p.read_text(), False) for p in sorted(folder.glob('*.py'))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == 'TYPE_CHECKING') or \
        (isinstance(t, ast.Attribute) and t.attr == 'TYPE_CHECKING')


def _import_nodes(tree: ast.AST, module_level: bool) -> Iterator[ast.stmt]:
    """Import statements; with ``module_level`` only those run at import time (not in functions or TYPE_CHECKING)."""
    if not module_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, mod: Module, modules: Modules, module_level: bool = False) -> Iterator[str]:
    """Dotted names a module imports: the module for ``import a.b``; for ``from a import x`` the submodule ``a.x``
    where one exists in ``modules``, else ``a.x`` with ``x`` a name of ``a`` (relative imports resolved)."""
    package = module if mod.is_package else module.rpartition('.')[0]
    for node in _import_nodes(ast.parse(mod.source), module_level):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
            continue
        if node.level:
            parts = package.split('.')
            base = '.'.join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module
        for a in node.names:
            yield base if a.name == '*' else f'{base}.{a.name}'


def _imports_all_submodules(mod: Module) -> bool:
    """A package ``__init__`` that imports its submodules by listing them (``pkgutil.iter_modules(__path__)``):
    the ast sees no import statement, but every public submodule is imported at import time."""
    if not mod.is_package:
        return False
    stack = list(ast.iter_child_nodes(ast.parse(mod.source)))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call) and getattr(node.func, 'attr', getattr(node.func, 'id', '')) == 'iter_modules' \
                and any(isinstance(a, ast.Name) and a.id == '__path__' for a in node.args):
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def import_graph(modules: Modules) -> Dict[str, Set[str]]:
    """Module-level import edges between the given modules.

    Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``: the importer gets an edge to the target and to each
    package above it that is not one of the importer's own packages (those are already being imported). So
    ``pkg.sub`` importing ``pkg`` (or a name from it) is an edge ``pkg.sub -> pkg``, a cycle when ``pkg`` imports
    ``pkg.sub``.
    """
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, mod in modules.items():
        own = {'.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 2)}
        for imported in imported_names(name, mod, modules, module_level=True):
            target = imported if imported in modules else imported.rpartition('.')[0]
            if target not in modules:
                continue  # outside the checked package
            parts = target.split('.')
            above = {'.'.join(parts[:i]) for i in range(1, len(parts))} - own
            graph[name] |= {target} | {p for p in above if p in modules}
        if _imports_all_submodules(mod):
            graph[name] |= {m for m in modules if m.rpartition('.')[0] == name and
                            not m.rpartition('.')[2].startswith('_')}
        graph[name].discard(name)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: Dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def private_imports(importer: str, mod: Module, modules: Modules, package: str = 'vitzoo') -> List[str]:
    """Imports of a private module or name of ``package`` (``_x`` anywhere in the dotted path) from outside the
    package that holds it: ``vitzoo.models._helpers`` is private to ``vitzoo.models``, ``vitzoo._mm`` to ``vitzoo``."""
    bad = []
    for imported in imported_names(importer, mod, modules):
        parts = imported.split('.')
        if parts[0] != package:
            continue
        for i, p in enumerate(parts):
            if p.startswith('_') and not (p.startswith('__') and p.endswith('__')):
                container = '.'.join(parts[:i])
                holder = container if modules.get(container, Module('', True)).is_package \
                    else container.rpartition('.')[0]
                if not _within(importer, [holder]):
                    bad.append(imported)
                break
    return bad


def sys_path_edits(source: str) -> List[int]:
    """Lines that change ``sys.path`` (method calls on it, assignments to it or its items, ``from sys import path``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == 'sys' and any(a.name == 'path' for a in node.names):
            lines.append(node.lineno)
        targets = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            targets = [node.func.value]
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            targets = [t.value if isinstance(t, ast.Subscript) else t for t in targets]
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr == 'path' and isinstance(t.value, ast.Name) \
                    and t.value.id == 'sys':
                lines.append(node.lineno)
    return sorted(set(lines))


def banned_imports(importer: str, mod: Module, modules: Modules, banned: Sequence[str],
                   module_level: bool = False) -> List[str]:
    """What ``importer`` imports from the ``banned`` modules / packages (relative imports resolved)."""
    return [n for n in imported_names(importer, mod, modules, module_level) if _within(n, banned)]


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


# ---------------------------------------------------------------------------------------------------------------- rules

def _layering_violations(modules: Modules) -> List[str]:
    """Layers import only torch, the standard library and other layers; models import no integration and no mm
    library; outside the integrations no vitzoo module imports an mm library."""
    bad = []
    for name, mod in modules.items():
        if _within(name, ['vitzoo.layers']):
            vitzoo_outside = [n for n in imported_names(name, mod, modules)
                              if n.split('.')[0] == 'vitzoo' and not _within(n, ['vitzoo.layers'])]
            bad += [f'{name} imports {n}' for n in banned_imports(name, mod, modules, LAYER_BANNED) + vitzoo_outside]
        if _within(name, ['vitzoo.models']):
            bad += [f'{name} imports {n}' for n in banned_imports(name, mod, modules, INTEGRATIONS)]
        if not _within(name, INTEGRATIONS):
            bad += [f'{name} imports {n}' for n in banned_imports(name, mod, modules, MM_LIBRARIES)]
    return bad


def _eager_integrations(modules: Modules) -> List[str]:
    """Core modules that reach an integration through module-level imports (they must import it in a function)."""
    graph = import_graph(modules)
    return [f'{name} -> {m}' for name in modules if not _within(name, INTEGRATIONS)
            for m in sorted(reachable(graph, name)) if _within(m, INTEGRATIONS)]


def _private_import_violations(modules: Modules, scripts: Modules) -> List[str]:
    return [f'{name}: {n}' for name, mod in {**modules, **scripts}.items()
            for n in private_imports(name, mod, modules)]


def _sys_path_violations(scripts: Modules) -> List[str]:
    return [f'{name}:{line}' for name, mod in scripts.items() for line in sys_path_edits(mod.source)]


@pytest.fixture(scope='module')
def package():
    return load_package()


def _scripts(*folders: str) -> Modules:
    out = {}
    for f in folders:
        out.update(load_files(ROOT / f))
    out.pop('tests.test_architecture', None)  # this file names private modules in its synthetic cases only
    return out


def test_layering(package):
    assert not _layering_violations(package)


def test_core_reaches_integrations_only_lazily(package):
    """``import vitzoo`` (and any core module) never imports mmengine / diffusers: the integrations are opt-in."""
    assert not _eager_integrations(package)


def test_no_import_cycle(package):
    assert find_cycle(import_graph(package)) is None


def test_tools_do_not_edit_sys_path():
    """Tools run against the installed package (``pip install -e .``), as a user's copy would."""
    assert not _sys_path_violations(_scripts('tools'))


def test_no_private_import_outside_its_package(package):
    assert not _private_import_violations(package, _scripts('tools', 'tests'))


# ---------------------------------------------------------------------------- the checkers see synthetic violations

def _synthetic(**sources: str) -> Modules:
    """Modules from keyword sources: ``pkg__sub='...'`` is ``pkg.sub``; a name ending in ``__init`` is a package."""
    out = {}
    for key, src in sources.items():
        is_package = key.endswith('__init')
        name = key[:-len('__init')] if is_package else key
        out[name.replace('__', '.')] = Module(src, is_package)
    return out


def test_cycle_checker_sees_cycles():
    # the cycle of today's main: weights -> models._helpers -> (package models) -> models.deit -> weights
    mods = _synthetic(
        vitzoo__init='from . import models',
        vitzoo__weights='from vitzoo.models._helpers import unwrap',
        vitzoo__models__init='import pkgutil, importlib\nfrom ._helpers import unwrap\n'
                             'for m in pkgutil.iter_modules(__path__):\n    importlib.import_module(m.name)',
        vitzoo__models___helpers='import torch',
        vitzoo__models__deit='from vitzoo.weights import build\nfrom ._helpers import unwrap')
    cycle = find_cycle(import_graph(mods))
    assert cycle and set(cycle) == {'vitzoo.weights', 'vitzoo.models', 'vitzoo.models.deit'}, cycle
    # the fix (a builder inside the models package) is acyclic
    mods['vitzoo.models.deit'] = Module('from ._builder import build\nfrom ._helpers import unwrap', False)
    mods['vitzoo.models._builder'] = Module('from ._helpers import unwrap', False)
    mods['vitzoo.weights'] = Module('from vitzoo.models._builder import build', False)
    assert find_cycle(import_graph(mods)) is None
    # a submodule importing a name of its own package while the package imports it; relative 'from .. import'
    mods['vitzoo.models.deit'] = Module('from . import CheckpointError', False)
    assert find_cycle(import_graph(mods)) == ['vitzoo.models', 'vitzoo.models.deit', 'vitzoo.models']
    mods['vitzoo.models.deit'] = Module('from .. import weights', False)
    mods['vitzoo.weights'] = Module('import vitzoo.models.deit', False)
    assert find_cycle(import_graph(mods))
    # imports inside functions or under TYPE_CHECKING run later: no edge
    mods['vitzoo.weights'] = Module('def f():\n    import vitzoo.models.deit\n'
                                    'if TYPE_CHECKING:\n    from vitzoo.models import deit', False)
    assert find_cycle(import_graph(mods)) is None
    # ... but a class body or a try block runs at import time
    mods['vitzoo.weights'] = Module('try:\n    import vitzoo.models.deit\nexcept ImportError:\n    pass', False)
    assert find_cycle(import_graph(mods))


def test_sys_path_checker_sees_edits():
    for src in ('import sys\nsys.path.insert(0, "..")', 'import sys\nif True:\n    sys.path.append("x")',
                'import sys\nsys.path[:0] = ["x"]', 'import sys\nsys.path += ["x"]', 'from sys import path'):
        assert sys_path_edits(src), src
    assert not sys_path_edits('import sys\nprint(sys.path)\nx = list(sys.path)')


def test_private_import_checker():
    mods = _synthetic(vitzoo__init='', vitzoo___mm='', vitzoo__models__init='', vitzoo__models___helpers='',
                      vitzoo__models__deit='')

    def bad(importer, src):
        return private_imports(importer, Module(src, False), mods)

    assert bad('tools.train', 'from vitzoo._mm import load') == ['vitzoo._mm.load']
    assert bad('tests.test_x', 'import vitzoo.models._helpers')
    assert bad('tests.test_x', 'def f():\n    from vitzoo.models import _helpers')  # lazily: still private
    assert bad('tools.train', 'from vitzoo.models.deit import _filter')
    assert bad('vitzoo.weights', 'from vitzoo.models._helpers import unwrap')  # vitzoo.models' private module
    assert bad('vitzoo.mm.backbones', 'from vitzoo.models.deit import _filter')
    assert not bad('vitzoo.models.deit', 'from ._helpers import unwrap\nfrom vitzoo.models._helpers import _x')
    assert not bad('vitzoo.mmdet', 'from vitzoo._mm import x')  # a private module of vitzoo, used inside vitzoo
    assert not bad('tools.train', 'from vitzoo.models import deit\nfrom vitzoo import __version__\nimport torch._C')


def test_layering_checkers_see_violations():
    base = dict(vitzoo__init='from . import models', vitzoo__models__init='from . import deit',
                vitzoo__layers__init='', vitzoo__mmdet='import mmdet', vitzoo__mm__init='import mmengine')
    assert not _layering_violations(_synthetic(**base, vitzoo__layers__attn='import torch\nfrom .sdpa import f',
                                               vitzoo__models__deit='import timm'))
    assert not _eager_integrations(_synthetic(**base, vitzoo__models__deit='def f():\n    import vitzoo.mmdet'))
    for key, src in (('vitzoo__layers__attn', 'from timm.layers import Mlp'),
                     ('vitzoo__layers__attn', 'def f():\n    import numpy as np'),
                     ('vitzoo__layers__attn', 'from ..models import deit'),
                     ('vitzoo__models__deit', 'from ..mm import backbones'),
                     ('vitzoo__models__deit', 'def f():\n    import vitzoo.mmseg'),
                     ('vitzoo__train_utils', 'def f():\n    from mmengine.runner import Runner')):
        assert _layering_violations(_synthetic(**base, **{key: src})), (key, src)
    eager = _synthetic(**base, vitzoo__models__deit='from vitzoo.mmdet import Backbone')
    assert _eager_integrations(eager)
    eager = _synthetic(**base, vitzoo__models__deit='', vitzoo__train_utils='import vitzoo.mm')
    assert _eager_integrations(eager) == ['vitzoo.train_utils -> vitzoo.mm']


def test_the_real_tree_is_read(package):
    """The checkers above run on the package: the known modules and edges are there."""
    graph = import_graph(package)
    assert 'vitzoo.models.agent_deit' in graph['vitzoo.models']  # the pkgutil loop in models/__init__
    assert 'vitzoo.models' in graph['vitzoo'] and 'vitzoo.layers.sdpa' in graph['vitzoo.layers.agent_attention']
    assert len(_scripts('tools')) >= 10


def test_version_and_registration():
    assert isinstance(vitzoo.__version__, str) and vitzoo.__version__.count('.') == 2
    assert vitzoo.utils.list_models('agent_deit_*')


def test_project_files_name_no_development_paths():
    """A user's clone has neither the development machines' folders nor their private notes: cite public sources."""
    bad = ('/work/', '../shared', 'shared/specs', 'specs/', 'ENVIRONMENT.md')
    offenders = []
    for folder in ('vitzoo', 'tools', 'tests', 'configs', 'weights', 'scripts'):
        for path in sorted((ROOT / folder).rglob('*')):
            if path.suffix not in {'.py', '.yaml', '.yml', '.md', '.sh', '.json', '.cfg', '.txt'} \
                    or path == Path(__file__).resolve():
                continue
            text = path.read_text(errors='replace')
            offenders += [f'{path.relative_to(ROOT)}: {b}' for b in bad if b in text]
    for name in ('README.md', 'setup.cfg', 'Makefile', 'pyproject.toml'):
        text = (ROOT / name).read_text()
        offenders += [f'{name}: {b}' for b in bad if b in text]
    assert not offenders, offenders
