#!/bin/sh
# tls-endpoint CERT_DIR PORT: serve CERT_DIR/server.crt|key with openssl s_server once the pair
# exists; idle until then (the unit is restarted by the role after the install). s_server -cert
# reads only the first certificate of a file, so the chain after the leaf goes to -cert_chain.
set -eu
dir=$1
port=$2
if [ -s "$dir/server.crt" ] && [ -s "$dir/server.key" ]; then
    chain=/run/tls-endpoint-$port-chain.pem
    awk '/-----BEGIN CERTIFICATE-----/ { n++ } n > 1' "$dir/server.crt" >"$chain"
    if [ -s "$chain" ]; then
        set -- -cert_chain "$chain"
    else
        set --
    fi
    exec /usr/bin/openssl s_server -quiet -www -accept "$port" -cert "$dir/server.crt" -key "$dir/server.key" "$@"
fi
exec sleep infinity
