// create_user: sign a user up, then create their customer at the payment API.
// Route: POST /signup (see [routes] in flux.toml), body {"email": "ada@example.com"}
//
// All ctx.db.query calls of one request run in one transaction. It commits when the function
// returns and rolls back when it throws. So when the payment API times out below, the error
// propagates, the request answers 500 "Stripe API timeout", and the users row is never
// committed. Fix the API (restart the stub without --slow), send the request again, and the
// row is written by the second request: `flux state history users --id ID` names it, and
// `flux trace REQUEST_ID` shows the failed attempt's spans, stripe.create among them.
export default async function (req, ctx) {
  const email = req.body?.email;
  if (typeof email !== "string" || !email.includes("@")) {
    return { status: 400, body: { error: 'send JSON like {"email": "ada@example.com"}' } };
  }

  // ON CONFLICT keeps the transaction healthy on a duplicate email: no row comes back.
  const { rows } = await ctx.db.query(
    "INSERT INTO users (email) VALUES ($1) ON CONFLICT (email) DO NOTHING RETURNING id, email, plan",
    [email],
  );
  if (rows.length === 0) {
    return { status: 409, body: { error: `${email} is already signed up` } };
  }
  const user = rows[0];

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
    if (err.timeout) throw new Error("Stripe API timeout");
    throw err;
  }
  if (!res.ok) {
    throw new Error(`Stripe API answered ${res.status}`);
  }
  const customer = await res.json();
  ctx.log("stripe customer created", { user_id: user.id, customer: customer.id });

  return { status: 201, body: { ...user, stripe_customer: customer.id } };
}
