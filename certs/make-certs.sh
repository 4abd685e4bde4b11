#!/usr/bin/env bash
# Development TLS material with OpenSSL: a CA, a broker certificate and optional client certificates.
#   bash certs/make-certs.sh [--out DIR] [--host NAME] [--client CN]...
# Writes DIR/ca.crt, DIR/broker.crt, DIR/broker.key and DIR/<CN>.crt, DIR/<CN>.key (keys mode 600).
# The broker certificate's SAN is localhost, 127.0.0.1 and --host (default: this machine's name).
# Private keys never belong in git (.gitignore keeps *.key and certs/out/ out).
set -euo pipefail
out="$(dirname "$0")/out"
host="$(hostname -f 2>/dev/null || hostname)"
clients=()
days=825
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --client) clients+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    *) echo "make-certs: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
umask 077
if [ ! -f "$out/ca.key" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" -subj "/CN=AllDS development CA" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi
sign() {  # name, subject CN, extensions
  openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$2" -keyout "$out/$1.key" -out "$out/$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$out/$1.ext"
  openssl x509 -req -in "$out/$1.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
    -sha256 -extfile "$out/$1.ext" -out "$out/$1.crt" 2>/dev/null
  rm -f "$out/$1.csr" "$out/$1.ext"
}
sign broker "$host" "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:$host
extendedKeyUsage=serverAuth"
for cn in "${clients[@]}"; do
  sign "$cn" "$cn" "extendedKeyUsage=clientAuth"
done
chmod 644 "$out"/*.crt
echo "make-certs: CA, broker certificate (SAN localhost, 127.0.0.1, $host)${clients:+ and clients ${clients[*]}} in $out"
