"""The YAML config: msgspec Structs, loading with file:line:path errors, env interpolation.

Loading has three steps, and every problem found on the way is collected and reported together:

1. The YAML is composed into nodes and turned into plain values by `Loader` (`source`), which
   records the line of every key path and expands `${VAR}` references (`interpolation`), so a
   missing variable has a line.
2. Keys of the contract that are not implemented yet are refused, then the values are converted
   into the Structs of `schema` (`convert`). Each source, endpoint and route is converted on its
   own, so one bad item does not hide the others; when msgspec rejects a value, the value is walked
   field by field to report every problem in it, not only the first.
3. Rules that span fields (references between sections, url xor subject, ...) are checked
   (`checks`), and plugin components (`verify:`, `signing:`) are converted into the config Struct
   their plugin registered, with the same error format (`components`).

`loading` puts the steps together; `endpoint` checks one endpoint from the management API the
same way, and `jsonschema` describes the config for editors. This module is the package's public
surface: import from `hookgate.config`.
"""

from hookgate.config.components import COMPONENT_KEYS
from hookgate.config.endpoint import CheckedEndpoint, load_endpoint
from hookgate.config.jsonschema import json_schema
from hookgate.config.loaded import Component, LoadedConfig
from hookgate.config.loading import UNSUPPORTED, load, load_server, loads, resolve_paths
from hookgate.config.problems import ConfigError, Problem, Report
from hookgate.config.proxies import listed_proxy
from hookgate.config.schema import (
    DEFAULT_RETRY_SCHEDULE,
    DEFAULT_SYNC,
    MAX_WORKERS,
    NAME_PATTERN,
    PREFIX_PATTERN,
    ROLES,
    BrokerConfig,
    BrokerTLS,
    Config,
    EgressConfig,
    EndpointConfig,
    ExponentialRetry,
    FilePath,
    LogConfig,
    Name,
    OpsConfig,
    Prefix,
    ResponseConfig,
    RetryConfig,
    Role,
    RouteConfig,
    ServerConfig,
    SourceConfig,
    TLSFiles,
    TracingConfig,
    WorkerCounts,
)
from hookgate.config.subjects import subject_matches, subject_refusal
from hookgate.types import INTERNAL_SOURCE

__all__ = [
    "COMPONENT_KEYS",
    "DEFAULT_RETRY_SCHEDULE",
    "DEFAULT_SYNC",
    "INTERNAL_SOURCE",
    "MAX_WORKERS",
    "NAME_PATTERN",
    "PREFIX_PATTERN",
    "ROLES",
    "UNSUPPORTED",
    "BrokerConfig",
    "BrokerTLS",
    "CheckedEndpoint",
    "Component",
    "Config",
    "ConfigError",
    "EgressConfig",
    "EndpointConfig",
    "ExponentialRetry",
    "FilePath",
    "LoadedConfig",
    "LogConfig",
    "Name",
    "OpsConfig",
    "Prefix",
    "Problem",
    "Report",
    "ResponseConfig",
    "RetryConfig",
    "Role",
    "RouteConfig",
    "ServerConfig",
    "SourceConfig",
    "TLSFiles",
    "TracingConfig",
    "WorkerCounts",
    "json_schema",
    "listed_proxy",
    "load",
    "load_endpoint",
    "load_server",
    "loads",
    "resolve_paths",
    "subject_matches",
    "subject_refusal",
]
