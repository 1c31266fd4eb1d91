"""Exit codes shared by the worker and the rendered units (RestartPreventExitStatus=)."""

# EX_CONFIG from sysexits.h: the app cannot be imported or is misconfigured. Restarting
# cannot help, so the service template lists it in RestartPreventExitStatus=.
EXIT_CONFIG = 78

# The app imported but its startup failed (an exception at import time other than an
# ImportError, or ASGI lifespan startup failed). Possibly transient: restarted.
EXIT_STARTUP = 3
