"""The data behind tests/test_architecture.py: layers, size limits, exceptions, forbidden text.

Edit this file (not the test) to move a module to another layer, to add a layer, or to grant a
function an exception to the length limit. Every rule is checked statically (ast), so nothing here
imports peftcalc or measure.
"""

# The packages whose modules make up the import graph (directories at the repository root).
PACKAGES = ("peftcalc", "measure")

# Layers of peftcalc/, lowest first. A module belongs to the layer of its longest matching entry:
# an entry matches itself and its dotted descendants ("peftcalc.ops" matches "peftcalc.ops" and
# "peftcalc.ops.linear", not "peftcalc.opsx"); a bare top-level package name ("peftcalc") matches
# only that package's __init__. A module may import from its own layer or any lower one; cycles
# within a layer are caught by the no-cycle rule. A module of peftcalc/ that no entry matches fails
# the layering test, so a new module has to be placed here.
LAYERS = [
    ["peftcalc.errors"],
    ["peftcalc.checks"],
    ["peftcalc.settings", "peftcalc.spec"],
    ["peftcalc.layout"],
    ["peftcalc.plan"],
    ["peftcalc.backward"],
    ["peftcalc.ops"],
    ["peftcalc.families"],
    ["peftcalc.config", "peftcalc.checkpointing", "peftcalc.unmodelled"],
    ["peftcalc.methods"],
    ["peftcalc.sim"],
    ["peftcalc.activations"],
    ["peftcalc.model_states", "peftcalc.memory", "peftcalc.offloading", "peftcalc.storage"],
    ["peftcalc.sharding"],
    ["peftcalc.hardware", "peftcalc.results"],
    ["peftcalc.training_configs"],
    ["peftcalc.api", "peftcalc.traced"],
    ["peftcalc.compare", "peftcalc.crossover", "peftcalc.format"],
    ["peftcalc.integrations"],
    ["peftcalc.cli", "peftcalc.cli_options", "peftcalc.__main__", "peftcalc"],
]

# The layered package (LAYERS places its modules).
LAYERED_PACKAGE = "peftcalc"

# Modules of the layered package that may import the packages above it (measure, reports), and
# then only inside a function (lazily), so that `import peftcalc...` never pulls them in.
UPPER_PACKAGES = ("measure", "reports")
MAY_IMPORT_UPPER_LAZILY = {"peftcalc.cli", "peftcalc.integrations.transformers", "peftcalc.integrations.memory_row"}

# Packages that may never import `reports` at all (any module, any depth, lazily or not).
MUST_NOT_IMPORT_REPORTS = ("measure",)

# Size limits (lines). A function is measured from its `def` line (decorators excluded) to its
# last line; methods and nested functions count on their own (and inside their enclosing one).
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 100

# "module:qualname" -> why this function may be longer than MAX_FUNCTION_LINES. Qualnames follow
# Python's __qualname__ ("Class.method", "outer.<locals>.inner"). The test fails when an entry no
# longer exists or is no longer over the limit, so remove an entry once its function is split.
LONG_FUNCTION_EXCEPTIONS = {
    "peftcalc.backward:run_backward_both":
        "the backward replay hot loop (benchmarked; see benchmarks/bench_estimate.py)",
}

# Modules that need not define __all__ (module docstrings are required everywhere).
ALL_NOT_REQUIRED = {"peftcalc.__main__"}

# User-facing text that must not mention the project's internal seeds/examples.
USER_FACING_FILES = ("README.md",)          # checked line by line
USER_FACING_MODULES = ("peftcalc/cli.py", "peftcalc/cli_options.py")  # every string constant checked
FORBIDDEN_TEXT = r"(?i)\bseeds? ?0\d\d\b|shared/seeds|\bExample 4\b"

# The import graph must have at least this many modules and edges (guards against a walker that
# silently finds nothing).
MIN_MODULES = 40
MIN_EDGES = 100
