# Sourced by the Docker build stages: turns the build arguments PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST and PIP_CERT_PEM (the text of extra CA certificates,
# e.g. a company proxy's) into pip's own environment settings, exporting only those that are
# set (pip reads an empty PIP_INDEX_URL as an empty index). The extra certificates are added
# to the system's bundle, not put in its place. Nothing is written outside
# /tmp/pip-cert.pem, which each build step deletes.
for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
    if [ -n "$(eval echo "\${$name:-}")" ]; then export "$name"; else unset "$name"; fi
done
if [ -n "${PIP_CERT_PEM:-}" ]; then
    { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "$PIP_CERT_PEM"; } > /tmp/pip-cert.pem
    export PIP_CERT=/tmp/pip-cert.pem
fi
unset PIP_CERT_PEM
