#!/bin/sh
# Lay out /etc/letsencrypt/live/demo/ the way certbot does (cert.pem, chain.pem, fullchain.pem,
# privkey.pem) with a leaf for demo.example.test issued by a fake intermediate under a fake root.
# The CA is made on the first call (in /root/fake-ca); every call issues a new leaf and key, as
# a renewal does.
set -eu
ca=/root/fake-ca
live=/etc/letsencrypt/live/demo
umask 077
mkdir -p "$ca" "$live"
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
if [ ! -s "$ca/int.crt" ]; then
    # shellcheck disable=SC2086
    openssl req -x509 $ec -keyout "$ca/root.key" -out "$ca/root.crt" -days 3650 -subj "/CN=Fake Root X1" 2>/dev/null
    # shellcheck disable=SC2086
    openssl req $ec -keyout "$ca/int.key" -out "$ca/int.csr" -subj "/CN=Fake Intermediate R1" 2>/dev/null
    printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n' >"$ca/int.ext"
    openssl x509 -req -in "$ca/int.csr" -CA "$ca/root.crt" -CAkey "$ca/root.key" -CAcreateserial \
        -days 1825 -extfile "$ca/int.ext" -out "$ca/int.crt" 2>/dev/null
fi
work=$(mktemp -d)
# shellcheck disable=SC2086
openssl req $ec -keyout "$work/privkey.pem" -out "$work/leaf.csr" -subj "/CN=demo.example.test" 2>/dev/null
printf 'subjectAltName=DNS:demo.example.test,DNS:www.demo.example.test\nbasicConstraints=CA:FALSE\n' >"$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$ca/int.crt" -CAkey "$ca/int.key" -CAcreateserial \
    -days 90 -extfile "$work/leaf.ext" -out "$work/cert.pem" 2>/dev/null
cp "$ca/int.crt" "$work/chain.pem"
cat "$work/cert.pem" "$work/chain.pem" >"$work/fullchain.pem"
chmod 0644 "$work/cert.pem" "$work/chain.pem" "$work/fullchain.pem"
for f in privkey.pem cert.pem chain.pem fullchain.pem; do
    mv -f "$work/$f" "$live/$f"
done
rm -rf "$work"
