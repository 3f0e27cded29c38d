// A stand-in for Keycloak in tests and `ccm dev`: oauth2-mock-server behind Keycloak's URL layout.
//
//   node tools/oidc-issuer/issuer.mjs [--realm NAME] [--port N] [--audience AUD] [--exit-on-stdin-close]
//
// Listens on 127.0.0.1 (port 0 = a free port) and serves, like Keycloak:
//   /realms/<realm>/.well-known/openid-configuration
//   /realms/<realm>/protocol/openid-connect/{auth,token,certs,userinfo,logout,revoke,token/introspect}
// Tokens are RS256 JWTs with Keycloak's claims: iss, sub, aud ([audience, "account"]), azp, typ,
// preferred_username, realm_access.roles, resource_access.<audience>.roles, scope, jti.
// Users (password grant, password "test"; or login_hint on /auth) and confidential clients
// (client_credentials, HTTP Basic or form secret) come from the tables below; unknown users and wrong
// passwords or secrets are refused (401) as Keycloak would.
//
// Test knobs, as extra token-request form fields: ccm_expired=1 (exp 10 minutes ago), ccm_audience=AUD
// (aud = AUD), ccm_ttl=SECONDS. Debug endpoints (not Keycloak's, tests only):
//   GET  /debug/stats   {"discovery":n,"certs":n,"token":n,"userinfo":n}: requests served so far
//   POST /debug/sign    {"user"|"client":name, "claims":{overrides, null deletes}, "kid":header kid,
//                        "signer":"issuer"|"foreign"} -> {"token"}; "foreign" signs with a second RSA
//                        key that is never published in the JWKS
//   POST /debug/rotate  -> {"kid"}: a new signing key (the old one stays in the JWKS, as in Keycloak)
//   POST /debug/config  {"token_ttl":seconds}: default lifetime of tokens issued from now on
// Prints one JSON line when ready: {"issuer","port","realm","audience","password","users","clients"}.

import { createHash, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';

const args = process.argv.slice(2);
const arg = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
};
const realm = arg('realm', process.env.OIDC_ISSUER_REALM ?? 'ccm');
const port = Number(arg('port', process.env.OIDC_ISSUER_PORT ?? '0'));
const audience = arg('audience', process.env.OIDC_ISSUER_AUDIENCE ?? 'ccm-api');
const PASSWORD = 'test';
const DEFAULT_LOGIN_USER = 'user';
let tokenTtl = 3600;

const subjectOf = (name) => {
  const h = createHash('sha256').update(`${realm}/${name}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
};
const USERS = {
  admin: { realm: ['admin', 'manager', 'user'] },
  manager: { realm: ['manager', 'user'] },
  user: { realm: ['user'] },
  viewer: { realm: ['viewer'] },
  assessment: { realm: ['assessment'] },
  guest: { realm: [] },
  // Holds its role only as a client role of the audience (resource_access), not as a realm role.
  operator: { realm: [], client: ['admin'] },
};
const CLIENTS = {
  scheduler: { secret: 'scheduler-secret', realm: ['service'] },
  controller: { secret: 'controller-secret', realm: ['service'] },
  assessment: { secret: 'assessment-secret', realm: ['assessment'] },
};

const issuer = new OAuth2Issuer();
const foreign = new OAuth2Issuer();
const service = new OAuth2Service(issuer, {
  wellKnownDocument: '/.well-known/openid-configuration',
  token: '/protocol/openid-connect/token',
  jwks: '/protocol/openid-connect/certs',
  authorize: '/protocol/openid-connect/auth',
  userinfo: '/protocol/openid-connect/userinfo',
  revoke: '/protocol/openid-connect/revoke',
  endSession: '/protocol/openid-connect/logout',
  introspect: '/protocol/openid-connect/token/introspect',
});
// Sign with the current key only (the store would round-robin over every key it holds).
let currentKid = (await issuer.keys.generate('RS256')).kid;
const storeGet = issuer.keys.get.bind(issuer.keys);
issuer.keys.get = (kid) => storeGet(kid ?? currentKid);
await foreign.keys.generate('RS256', { kid: currentKid });

const stats = { discovery: 0, certs: 0, token: 0, userinfo: 0 };
const codeUsers = new Map(); // authorization code -> user
const refreshUsers = new Map(); // refresh token -> principal
const principals = new WeakMap(); // token request -> { kind, name } | { error }
const signed = new WeakSet(); // token requests whose access token is signed (the next one is the id_token)

const basicAuth = (req) => {
  const m = /^Basic (.+)$/i.exec(req.headers.authorization ?? '');
  if (!m) return undefined;
  const [id, ...secret] = Buffer.from(m[1], 'base64').toString().split(':');
  return { id: decodeURIComponent(id), secret: decodeURIComponent(secret.join(':')) };
};
const principalOf = (req) => {
  if (principals.has(req)) return principals.get(req);
  const b = req.body;
  let p;
  if (b.grant_type === 'client_credentials') {
    const cred = basicAuth(req) ?? { id: b.client_id, secret: b.client_secret };
    const client = CLIENTS[cred.id];
    p = client && client.secret === cred.secret ? { kind: 'client', name: cred.id, clientId: cred.id }
      : { status: 401, error: 'unauthorized_client', description: 'Invalid client or Invalid client credentials' };
  } else {
    const clientId = basicAuth(req)?.id ?? b.client_id ?? 'ccm-web';
    const name = b.grant_type === 'password' ? (b.password === PASSWORD ? b.username : undefined)
      : b.grant_type === 'authorization_code' ? codeUsers.get(b.code)
        : b.grant_type === 'refresh_token' ? refreshUsers.get(b.refresh_token) : undefined;
    p = name !== undefined && USERS[name] ? { kind: 'user', name, clientId }
      : b.grant_type === 'password' ? { status: 401, error: 'invalid_grant', description: 'Invalid user credentials' }
        : { status: 400, error: 'invalid_grant', description: 'Code or refresh token not valid' };
  }
  principals.set(req, p);
  return p;
};

// The standard claims of a principal's access token (the mock already set iss, iat, nbf, exp).
const identityClaims = ({ kind, name, clientId }) => {
  const entry = kind === 'client' ? CLIENTS[name] : USERS[name];
  const username = kind === 'client' ? `service-account-${name}` : name;
  return {
    sub: subjectOf(username), typ: 'Bearer', azp: clientId, preferred_username: username,
    aud: [audience, 'account'], jti: randomUUID(), scope: 'openid profile email',
    realm_access: { roles: entry.realm },
    resource_access: entry.client ? { [audience]: { roles: entry.client } } : {},
    ...(kind === 'client' ? { client_id: clientId } : { name: `Test ${name}`, email: `${name}@example.test` }),
  };
};
const applyOverrides = (payload, overrides) => {
  for (const [k, v] of Object.entries(overrides ?? {})) {
    if (v === null) delete payload[k];
    else payload[k] = v;
  }
};

service.on('beforeTokenSigning', (token, req) => {
  const p = principalOf(req);
  if (p.error) return; // refused in beforeResponse
  const now = Math.floor(Date.now() / 1000);
  const ttl = Number(req.body.ccm_ttl ?? tokenTtl);
  const base = identityClaims(p);
  if (signed.has(req)) {
    // The id_token of a user grant: identity only, for the client.
    delete base.realm_access;
    delete base.resource_access;
    Object.assign(base, { typ: 'ID', aud: p.clientId });
  } else if (req.body.ccm_audience !== undefined) {
    base.aud = req.body.ccm_audience;
  }
  signed.add(req);
  Object.assign(token.payload, base, { iat: now, nbf: now - 10, exp: now + ttl });
  if (req.body.ccm_expired === '1') Object.assign(token.payload, { iat: now - 3600, nbf: now - 3600, exp: now - 600 });
});
service.on('beforeResponse', (response, req) => {
  const p = principalOf(req);
  if (p.error) {
    response.statusCode = p.status;
    response.body = { error: p.error, error_description: p.description };
    return;
  }
  response.body.expires_in = Number(req.body.ccm_ttl ?? tokenTtl);
  if (response.body.refresh_token) refreshUsers.set(response.body.refresh_token, p.name);
});
service.on('beforeAuthorizeRedirect', (redirect, req) => {
  const code = redirect.url.searchParams.get('code');
  if (code) codeUsers.set(code, req.query.login_hint ?? DEFAULT_LOGIN_USER);
});
service.on('beforeUserinfo', (response, req) => {
  // Decodes (does not verify) the bearer token, enough for a stand-in.
  try {
    const token = /^Bearer (.+)$/i.exec(req.headers.authorization ?? '')[1];
    const claims = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
    const { sub, preferred_username, name, email } = claims;
    response.body = { sub, preferred_username, name, email, realm_access: claims.realm_access };
  } catch {
    response.statusCode = 401;
    response.body = { error: 'invalid_token', error_description: 'Token verification failed' };
  }
});

const readJson = (req) => new Promise((resolve, reject) => {
  let data = '';
  req.on('data', (chunk) => { data += chunk; });
  req.on('end', () => { try { resolve(data ? JSON.parse(data) : {}); } catch (e) { reject(e); } });
});
const sendJson = (res, status, body) => {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
};
const debug = async (req, res, path) => {
  if (req.method === 'GET' && path === '/debug/stats') return sendJson(res, 200, stats);
  const body = await readJson(req);
  if (req.method === 'POST' && path === '/debug/config') {
    if (body.token_ttl !== undefined) tokenTtl = Number(body.token_ttl);
    return sendJson(res, 200, { token_ttl: tokenTtl });
  }
  if (req.method === 'POST' && path === '/debug/rotate') {
    currentKid = (await issuer.keys.generate('RS256')).kid;
    return sendJson(res, 200, { kid: currentKid });
  }
  if (req.method === 'POST' && path === '/debug/sign') {
    const p = body.client != null ? { kind: 'client', name: body.client, clientId: body.client }
      : { kind: 'user', name: body.user ?? 'user', clientId: 'ccm-web' };
    if (!(p.kind === 'client' ? CLIENTS : USERS)[p.name]) return sendJson(res, 400, { error: `unknown ${p.kind} ${p.name}` });
    const signer = body.signer === 'foreign' ? foreign : issuer;
    const token = await signer.buildToken({
      kid: signer === foreign ? foreign.keys.toJSON()[0].kid : undefined,
      expiresIn: tokenTtl,
      scopesOrTransform: (header, payload) => {
        Object.assign(payload, identityClaims(p), { iss: issuer.url });
        applyOverrides(payload, body.claims);
        if (body.kid != null) header.kid = body.kid;
      },
    });
    return sendJson(res, 200, { token });
  }
  return sendJson(res, 404, { error: 'not found' });
};

const prefix = `/realms/${realm}`;
const server = createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (path.startsWith('/debug/')) {
    debug(req, res, path).catch((e) => sendJson(res, 400, { error: String(e) }));
    return;
  }
  if (!path.startsWith(`${prefix}/`)) return sendJson(res, 404, { error: 'Realm does not exist' });
  req.url = req.url.slice(prefix.length);
  const inner = path.slice(prefix.length);
  if (inner === '/.well-known/openid-configuration') stats.discovery += 1;
  else if (inner === '/protocol/openid-connect/certs') stats.certs += 1;
  else if (inner === '/protocol/openid-connect/token') stats.token += 1;
  else if (inner === '/protocol/openid-connect/userinfo') stats.userinfo += 1;
  service.requestHandler(req, res);
});
server.listen(port, '127.0.0.1', () => {
  const actual = server.address().port;
  issuer.url = `http://127.0.0.1:${actual}${prefix}`;
  foreign.url = issuer.url;
  const users = Object.fromEntries(Object.entries(USERS).map(([n, u]) => [n, { sub: subjectOf(n), roles: u.realm }]));
  const clients = Object.fromEntries(Object.entries(CLIENTS).map(([n, c]) => [n, {
    sub: subjectOf(`service-account-${n}`), secret: c.secret, roles: c.realm,
  }]));
  process.stdout.write(`${JSON.stringify({ issuer: issuer.url, port: actual, realm, audience, password: PASSWORD, users, clients })}\n`);
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (args.includes('--exit-on-stdin-close')) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
