"""Loaded by the ``opentelemetry-instrument`` launcher before it starts the program (entry
point group ``opentelemetry_environment_variables``): importing it applies
:func:`timetracer_otel.autoinstrument.launcher_defaults` to the environment the program
inherits. No name here may start with ``OTEL_``: the launcher turns those into flags.
"""

from timetracer_otel.autoinstrument import launcher_defaults as _launcher_defaults

_launcher_defaults()
