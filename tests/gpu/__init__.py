"""The GPU suite (``tests/gpu/run.sh``). A package, so that its conftest does not replace the
suite's ``conftest`` module that ``from conftest import ...`` in tests/*.py reads (pytest drops a
package-less conftest's module from ``sys.modules`` before importing another one of that name)."""
