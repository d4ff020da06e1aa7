"""The local catalog: a SQLite index and content-addressed store of models and adapters, with lineage,
attached results, model cards and names that work wherever a path does.

May import formats, model, lora, adapters and runtime; must not import train, serve, eval or cli. This
package's own import is torch-free (store, names, resolve); adding, exporting and cards import the model
code when called. No network, ever.
"""

from nomoat.catalog.home import home_dir
from nomoat.catalog.names import DEFAULT_MODEL, DEFAULT_TAG, Ref, check_new_name, parse_ref
from nomoat.catalog.resolve import artifact_for_path, resolve_adapter, resolve_model
from nomoat.catalog.store import Artifact, Catalog

__all__ = ["DEFAULT_MODEL", "DEFAULT_TAG", "Artifact", "Catalog", "Ref", "artifact_for_path", "check_new_name",
           "home_dir", "parse_ref", "resolve_adapter", "resolve_model"]
