"""gunicorn settings for tests: no config file from the working directory, quiet logs."""

loglevel = "warning"
timeout = 30
