// create_user: sign a user up, then create their customer at the payment API.
// Route: POST /signup (see [routes] in flux.toml), body {"email": "ada@example.com"}
//
// All ctx.db.query calls of one request run in one transaction: it commits when the function
// returns, and rolls back when it throws. This function has the bug the quickstart debugs:
// when the payment API times out it *returns* a 500, so the users row it inserted is
// committed without a stripe_customer. `flux why REQUEST_ID` shows the timeout and the row;
// `flux state history users --id ID` shows who wrote what. Sending the same email again,
// once the API answers, fills stripe_customer in (a second request in the row's history).
export default async function (req, ctx) {
  const email = req.body?.email;
  if (typeof email !== "string" || !email.includes("@")) {
    return { status: 400, body: { error: 'send JSON like {"email": "ada@example.com"}' } };
  }

  // A retry finds the row the first attempt wrote.
  let { rows } = await ctx.db.query(
    "INSERT INTO users (email) VALUES ($1) ON CONFLICT (email) DO NOTHING RETURNING id, email, plan, stripe_customer",
    [email],
  );
  if (rows.length === 0) {
    ({ rows } = await ctx.db.query("SELECT id, email, plan, stripe_customer FROM users WHERE email = $1", [email]));
  }
  const user = rows[0];
  if (user.stripe_customer) {
    return { status: 200, body: user };
  }

  let res;
  try {
    res = await ctx.fetch("http://127.0.0.1:4010/v1/customers", {
      method: "POST",
      name: "stripe.create", // span name; without it the span would be "stripe.customers" ([tools])
      headers: {
        authorization: `Bearer ${ctx.secrets.STRIPE_KEY}`,
        "content-type": "application/json",
      },
      body: JSON.stringify({ email }),
    });
  } catch (err) {
    // err.timeout is set when no answer came within [fetch] timeout_ms.
    if (err.timeout) {
      ctx.log("payment API timed out", { user_id: user.id });
      return { status: 500, body: { error: "Stripe API timeout", user_id: user.id } };
    }
    throw err;
  }
  if (!res.ok) {
    throw new Error(`Stripe API answered ${res.status}`);
  }
  const customer = await res.json();
  await ctx.db.query("UPDATE users SET stripe_customer = $1 WHERE id = $2", [customer.id, user.id]);
  ctx.log("stripe customer created", { user_id: user.id, customer: customer.id });

  return { status: 201, body: { ...user, stripe_customer: customer.id } };
}
