"""The admin REST API (FastAPI): thin routes over ``control.service.TenantService``."""
