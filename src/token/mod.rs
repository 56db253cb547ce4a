//! Access tokens (DESIGN §4.1, §4.2): the broker's Ed25519 signing key and JWKS, the JWT
//! claims, verification with the RFC 8725 rules, client authentication at the token
//! endpoint, and the token request form.
//!
//! Issuing is `SigningKeys::sign(&AccessClaims)`; the token endpoint decides the claims.

pub mod claims;
pub mod client_auth;
pub mod endpoint;
pub mod form;
pub mod keys;
pub mod lockout;
pub mod verify;

pub use claims::{new_jti, AccessClaims, AuthorizationDetail, Confirmation};
pub use client_auth::{generate_client_secret, parse_basic, secret_matches, ClientAuthError};
pub use form::{parse_authorization_details, parse_token_form, FormError, TokenForm};
pub use keys::{generate_signing_key_pem, KeyError, SigningKeys};
pub use verify::{TokenError, TokenVerifier, VerifiedTokenCache};
