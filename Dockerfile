# One image for every notify process: the five services, the one-shot certificate maker
# and the dev peers (mail catcher, FCM stand-in). compose.yaml picks the process with
# `command:` (e.g. ["python", "-m", "user_svc"]) and configures it with NOTIFY_* variables.
# No HEALTHCHECK here: what "healthy" means differs per process (gRPC health for the
# services, an open port for the peers), so compose.yaml declares each probe.
FROM python:3.11-slim

# GRPC_ENABLE_FORK_SUPPORT=false: the processes fork only to exec a fresh interpreter
# (render processes), and gRPC's fork handlers can crash a child forked while channels
# are active (grpc/grpc#43055); scripts/system.py sets the same for local processes.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRPC_ENABLE_FORK_SUPPORT=false \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed uid: the certificate keys are written 0600 by this user into a shared volume,
# and compose runs Envoy under the same uid (ENVOY_UID) so it can read its key. The
# mount points exist and belong to the user so that fresh named volumes inherit that.
ARG NOTIFY_UID=10001
RUN groupadd --system --gid "${NOTIFY_UID}" notify \
 && useradd --system --uid "${NOTIFY_UID}" --gid notify --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin notify \
 && install -d -o notify -g notify /certs /var/notify/mail /var/notify/fcm

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY proto/ proto/
COPY gen/ gen/
COPY notify_kit/ notify_kit/
COPY gateway/ gateway/
COPY user_svc/ user_svc/
COPY template_svc/ template_svc/
COPY email_worker/ email_worker/
COPY push_worker/ push_worker/
COPY scripts/ scripts/
# Runtime dependencies only (no dev extras), at the versions CI tested.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt . \
 && rm -rf build ./*.egg-info

USER notify
CMD ["python", "-c", "raise SystemExit('usage: python -m gateway|user_svc|template_svc|email_worker|push_worker (configured by NOTIFY_* variables, see compose.yaml); python scripts/gen_certs.py --dir DIR; python -m scripts.mailcatcher|scripts.fcm_fake --help')"]
