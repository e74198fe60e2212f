"""The admin web console: server-rendered pages (Jinja2 templates in templates/),
every asset served locally, login with a signed session cookie, CSRF-checked forms."""
