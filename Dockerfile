# One image for web, worker, beat and pilot; the command chooses the role (see docker-compose.yml).
# The pilot role runs as root (docker-compose.yml: user: root) with --payload-user wms, so that
# its payloads run as the unprivileged "wms" account and cannot read its secrets or spool.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY config ./config
COPY wms ./wms
COPY tasks ./tasks
COPY jobs ./jobs
COPY files ./files
COPY pilots ./pilots
COPY payloads ./payloads
RUN /opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install .

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=config.settings \
    WMS_VAR_DIR=/var/lib/wms \
    WMS_LOG_FORMAT=json
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin wms \
    && mkdir -p /var/lib/wms /app && chown -R wms:wms /var/lib/wms /app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=wms:wms manage.py ./
COPY --chown=wms:wms templates ./templates
USER wms
# The admin's and Swagger UI's static files, served by whitenoise under gunicorn.
RUN DJANGO_SECRET_KEY=build-only python manage.py collectstatic --noinput -v0
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"
CMD ["gunicorn", "config.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2", "--access-logfile", "-"]
