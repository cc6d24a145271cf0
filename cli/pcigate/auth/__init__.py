"""Sign-in: OIDC flows (:mod:`pcigate.auth.oidc`), the keyring token store (:mod:`pcigate.auth.tokens`)
and the bearer used for broker calls (:mod:`pcigate.auth.credentials`)."""
