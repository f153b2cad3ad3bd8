"""Configuration: YAML + ``${VAR}`` interpolation + ``CCP_*`` overrides -> an immutable ``Settings``.

Where each rule lives:

* ``keys``: every key, declared once (doc line, check, file-ness, env name);
  type and default are its field's in ``proxy.settings``;
* ``load``: reading the files (YAML, duplicate keys, ``routes_file``, the packaged table);
* ``parse``: ``parse_config``, the assembly: each section read, coerced and checked;
* ``env``: ``${VAR}`` (one grammar, also for check-config's template mode) and ``CCP_*`` overrides;
* ``values``: coercion of one value and the checks keys are built from;
* ``addresses``, ``cache_url``: the ``host[:port]``/listen and ``cache.url`` grammars, one parser
  each (``parse_cache_url`` is also what ``proxy.tokens.redis_connect`` connects with);
* ``cross_checks``: rules across keys; ``routes``: the ``routes:`` schema and table rules;
* ``report``: the one problem collector every step records into;
* ``inspect``: check-config and explain, as text; ``reference``: config/README.md's key table.

``parse_config`` is pure, so a reload can call it freely: the result depends
only on the mapping and the environment it is given, nothing is changed,
kept or connected to, and it either returns a whole new ``Settings`` or
raises ``ConfigError`` with every problem. The only outside reads are of the
files the config names, and only with ``check_files``: each is checked for
readability, and the sealing key file is parsed (not kept) so a bad key is a
config error; the client secret is read at run time by the credential
loader, so rotation works.
"""

from __future__ import annotations

from proxy.config.env import references
from proxy.config.load import load_config, read_yaml
from proxy.config.parse import parse_config

__all__ = ["load_config", "parse_config", "read_yaml", "references"]
