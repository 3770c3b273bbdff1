#!/usr/bin/env bash
# Makes the certificates of the TLS tests in DIR with the openssl command line: a CA (ca.pem),
# a certificate for the service (server.pem/key: DNS localhost, IP 127.0.0.1 and DNS
# ringattn-internal, for both the public API and the internal plane, server and client use),
# client certificates signed by that CA (alice.pem/key, CN alice; bob.pem/key, CN bob) and one
# signed by another CA (rogue.pem/key). Exits 77 when openssl is missing.
# Usage: make_test_certs.sh DIR
set -eu
DIR=${1:?usage: make_test_certs.sh DIR}
command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 77; }
mkdir -p "$DIR"
cd "$DIR"
KEY=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

# A self-signed CA: ca_cert NAME
ca_cert() {
  openssl req -x509 "${KEY[@]}" -keyout "$1.key" -out "$1.pem" -days 2 -subj "/CN=$1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    2>/dev/null
}
# A leaf signed by CA: leaf NAME CA SERIAL EXTENSIONS
leaf() {
  openssl req "${KEY[@]}" -keyout "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
  printf '%b' "basicConstraints=CA:FALSE\n$4\n" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -set_serial "$3" -days 2 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

ca_cert ca
ca_cert rogue_ca
leaf server ca 2 \
  "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:ringattn-internal\nextendedKeyUsage=serverAuth,clientAuth"
leaf alice ca 3 "subjectAltName=DNS:alice\nextendedKeyUsage=clientAuth"
leaf bob ca 4 "subjectAltName=DNS:bob\nextendedKeyUsage=clientAuth"
leaf rogue rogue_ca 5 "subjectAltName=DNS:alice\nextendedKeyUsage=clientAuth"
chmod 600 ./*.key
