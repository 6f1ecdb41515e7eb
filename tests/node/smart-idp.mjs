// The hospital's identity provider for the viewer's SMART App Launch tests: oidc-provider from
// npm, configured as a SMART-capable IdP — scopes `launch`, `launch/patient` and `fhirUser`,
// the launch context's `patient` in the token response, the users' roles in an ID-token claim —
// and a page standing in for the EHR, which launches Strata with `iss` and `launch`.
//
// node smart-idp.mjs PORT STRATA_BASE ACCOUNTS_JSON
//   ACCOUNTS_JSON: {"dr-ehr": {"roles": ["clinician"], "fhirUser": "Practitioner/7", "patient": "MRN-1"}}
//   (`patient`: the one a standalone launch with launch/patient gets.)
// Prints "listening" once it serves.
import Provider from 'oidc-provider';
import { randomUUID } from 'node:crypto';

const [port, strataBase, accountsJson] = process.argv.slice(2);
const accounts = JSON.parse(accountsJson);
const issuer = `http://127.0.0.1:${port}`;

const launches = new Map(); // launch id -> the EHR's patient id
const launchOfCode = new Map(); // authorization code -> launch id
const standaloneOfCode = new Map(); // authorization code -> account id

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'strata-viewer',
    token_endpoint_auth_method: 'none',
    application_type: 'native',
    redirect_uris: [`${strataBase}/ui/callback`],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  scopes: ['openid', 'fhirUser', 'launch', 'launch/patient'],
  claims: { openid: ['sub', 'hospital_roles'], fhirUser: ['fhirUser'] },
  extraParams: ['launch', 'aud'],
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  cookies: { keys: ['strata-test-only-cookie-key'] },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    const a = accounts[id];
    if (!a) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, hospital_roles: a.roles, fhirUser: a.fhirUser };
      },
    };
  },
});
provider.proxy = false;

// SMART launch context: remember which launch an authorization code answers, and put its
// patient in the token response.
provider.use(async (ctx, next) => {
  await next();
  const location = ctx.response.get('location');
  const params = ctx.oidc?.params;
  if (location && params && location.startsWith(`${strataBase}/ui/callback`)) {
    const code = new URL(location).searchParams.get('code');
    if (code && params.launch) launchOfCode.set(code, params.launch);
    if (code && !params.launch && String(params.scope || '').split(' ').includes('launch/patient')) {
      standaloneOfCode.set(code, ctx.oidc.session?.accountId);
    }
  }
  if (ctx.oidc?.route === 'token' && ctx.body && ctx.body.access_token) {
    const code = ctx.oidc.params?.code;
    const launch = launchOfCode.get(code);
    if (launch && launches.has(launch)) ctx.body.patient = launches.get(launch);
    const account = standaloneOfCode.get(code);
    if (account && accounts[account]?.patient) ctx.body.patient = accounts[account].patient;
  }
});

// The EHR: a page with a button that launches Strata for one of its patients.
provider.use(async (ctx, next) => {
  if (ctx.path !== '/ehr') return next();
  const patient = ctx.query.patient;
  const launch = randomUUID();
  launches.set(launch, patient);
  const url = `${strataBase}/ui/launch?iss=${encodeURIComponent(`${strataBase}/fhir`)}&launch=${launch}`;
  ctx.type = 'html';
  ctx.body = `<!DOCTYPE html><html lang="en"><head><title>EHR</title></head><body><main>
<h1>EHR: patient ${String(patient).replace(/[^A-Za-z0-9-]/g, '')}</h1>
<a id="open-archive" href="${url}">Legacy chart (Strata archive)</a></main></body></html>`;
});

provider.listen(Number(port), '127.0.0.1', () => console.log('listening'));
